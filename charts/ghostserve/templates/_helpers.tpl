{{/* Names, labels and small computations shared by the templates. */}}

{{- define "ghostserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Object-name prefix: the release name, plus the chart name unless the release already has it. */}}
{{- define "ghostserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "ghostserve.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ghostserve.operatorName" -}}
{{- printf "%s-operator" (include "ghostserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ghostserve.sidecarName" -}}
{{- printf "%s-sidecar" (include "ghostserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ghostserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "ghostserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ghostserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "ghostserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ghostserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ghostserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
A memory quantity in whole MiB (Ki rounds up). Only binary suffixes are accepted so that the
sidecar's memory limit is exact; anything else fails the render with a clear message.
*/}}
{{- define "ghostserve.quantityMi" -}}
{{- $q := toString . -}}
{{- if not (regexMatch "^[0-9]+(Ki|Mi|Gi|Ti)$" $q) -}}
{{- fail (printf "memory quantity %q: use a whole number with a Ki, Mi, Gi or Ti suffix" $q) -}}
{{- end -}}
{{- $n := regexFind "^[0-9]+" $q | atoi -}}
{{- $unit := regexFind "(Ki|Mi|Gi|Ti)$" $q -}}
{{- if eq $unit "Ki" -}}{{ div (add $n 1023) 1024 }}
{{- else if eq $unit "Mi" -}}{{ $n }}
{{- else if eq $unit "Gi" -}}{{ mul $n 1024 }}
{{- else -}}{{ mul $n 1048576 }}
{{- end -}}
{{- end -}}

{{/* The sidecar's memory request and limit: the parity budget plus the process overhead. */}}
{{- define "ghostserve.sidecarMemory" -}}
{{- $budget := include "ghostserve.quantityMi" .Values.sidecar.hostMemoryBudget | atoi -}}
{{- $overhead := include "ghostserve.quantityMi" .Values.sidecar.memoryOverhead | atoi -}}
{{- printf "%dMi" (add $budget $overhead) -}}
{{- end -}}

{{/* Paths inside the containers; the engine contract fixes the socket at /run/ghostserve/sidecar.sock. */}}
{{- define "ghostserve.socketMount" -}}/run/ghostserve{{- end -}}
{{- define "ghostserve.tlsMount" -}}/etc/ghostserve/tls{{- end -}}

{{/* Container-level security settings every GhostServe container shares. */}}
{{- define "ghostserve.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* exec probe: a grpc.health.v1 Check over the sidecar's Unix socket, as a JSON list. */}}
{{- define "ghostserve.sidecarHealthCommand" -}}
{{- $code := printf "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('unix://%s/sidecar.sock')).Check(h.HealthCheckRequest(), timeout=4).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)" (include "ghostserve.socketMount" .) -}}
{{- list "python" "-c" $code | toJson -}}
{{- end -}}
