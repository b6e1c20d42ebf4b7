{{/* Names, labels and small computations shared by the templates. */}}

{{- define "ghostserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Object-name prefix: the release name, plus the chart name unless the release already has it.
At most 45 characters, so that the longest derived name, "<prefix>-operator-metrics" (17 more), stays
within the 63 of a DNS label for every release name Helm accepts (53 characters).
*/}}
{{- define "ghostserve.fullname" -}}
{{- $full := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else -}}
{{- $name := include "ghostserve.name" . -}}
{{- if contains $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- else -}}
{{- $full = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- end -}}
{{- $full = $full | trunc 45 | trimSuffix "-" -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $full) -}}
{{- fail (printf "object-name prefix %q (from the release name or fullnameOverride) must start with a lowercase letter and hold only a-z, 0-9 and '-': Services need DNS-1035 labels" $full) -}}
{{- end -}}
{{- $full -}}
{{- end -}}

{{- define "ghostserve.operatorName" -}}
{{- printf "%s-operator" (include "ghostserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ghostserve.sidecarName" -}}
{{- printf "%s-sidecar" (include "ghostserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ghostserve.gatewayRoleName" -}}
{{- printf "%s-gateway" (include "ghostserve.fullname" .) -}}
{{- end -}}

{{- define "ghostserve.leaseName" -}}
{{- printf "%s-leader" (include "ghostserve.fullname" .) -}}
{{- end -}}

{{/*
Values the schema cannot check: ports that would clash inside one pod (or on the node, for the
sidecar's hostPort), and memory sizes that would overflow. Included by every workload template.
*/}}
{{- define "ghostserve.validate" -}}
{{- if eq (int .Values.operator.healthPort) (int .Values.operator.metricsPort) -}}
{{- fail (printf "operator.healthPort and operator.metricsPort are both %d: the operator pod needs two ports" (int .Values.operator.healthPort)) -}}
{{- end -}}
{{- if eq (int .Values.sidecar.port) (int .Values.sidecar.metricsPort) -}}
{{- fail (printf "sidecar.port and sidecar.metricsPort are both %d: the sidecar pod needs two ports" (int .Values.sidecar.port)) -}}
{{- end -}}
{{- $budget := include "ghostserve.quantityMi" .Values.sidecar.hostMemoryBudget | atoi -}}
{{- $overhead := include "ghostserve.quantityMi" .Values.sidecar.memoryOverhead | atoi -}}
{{- range $key, $dir := dict "sidecar.socketDir" .Values.sidecar.socketDir "sidecar.shmDir" .Values.sidecar.shmDir -}}
{{- if or (eq $dir "/") (regexMatch "(^|/)[.][.]?(/|$)" $dir) (hasSuffix "/" $dir) -}}
{{- fail (printf "%s %q: give a dedicated absolute directory (not /, no . or .. segments, no trailing /); rank pods mount it" $key $dir) -}}
{{- end -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) -}}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled: two operators without a leader would both act on every fault" -}}
{{- end -}}
{{- with .Values.operator.leaderElection -}}
{{- if not (and (lt (int .retrySeconds) (int .renewDeadlineSeconds)) (lt (int .renewDeadlineSeconds) (int .leaseSeconds))) -}}
{{- fail (printf "operator.leaderElection needs retrySeconds < renewDeadlineSeconds < leaseSeconds, got %d, %d, %d" (int .retrySeconds) (int .renewDeadlineSeconds) (int .leaseSeconds)) -}}
{{- end -}}
{{- end -}}
{{- include "ghostserve.validateTls" . -}}
{{- if eq (int .Values.sidecar.runAsUser) (int .Values.rankPods.runAsUser) -}}
{{- fail (printf "sidecar.runAsUser and rankPods.runAsUser are both %d: the sidecar treats callers with its own UID as the operator, so every engine could read and delete every other model's KV on its node" (int .Values.sidecar.runAsUser)) -}}
{{- end -}}
{{- if gt (add $budget $overhead) 67108864 -}}
{{- fail (printf "sidecar.hostMemoryBudget + sidecar.memoryOverhead = %dMi is above 64Ti: no node has that much memory (a typo?)" (add $budget $overhead)) -}}
{{- end -}}
{{- end -}}

{{/*
How the sidecars' TCP port is secured: "cert-manager", "secret" or "insecure". values.schema.json
checks tls.mode already; this fails the same way when a render skips the schema, and turns the removed
switches of older charts into a pointer to tls.mode instead of a silent downgrade.
*/}}
{{- define "ghostserve.tlsMode" -}}
{{- $tls := .Values.tls -}}
{{- if or (hasKey $tls "enabled") (hasKey ($tls.certManager | default dict) "enabled") -}}
{{- fail "tls.enabled and tls.certManager.enabled were replaced by tls.mode: cert-manager (default; mTLS with certificates from cert-manager), secret (mTLS with Secrets you create) or insecure (plaintext, unsafe)" -}}
{{- end -}}
{{- $mode := toString $tls.mode -}}
{{- if not (has $mode (list "cert-manager" "secret" "insecure")) -}}
{{- fail (printf "tls.mode %q is not a mode: use cert-manager (mTLS with certificates from cert-manager), secret (mTLS with Secrets you create) or insecure (plaintext, unsafe)" $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/* "true" when the sidecars' TCP port runs mutual TLS (every mode but insecure), else "". */}}
{{- define "ghostserve.mtls" -}}
{{- if ne (include "ghostserve.tlsMode" .) "insecure" -}}true{{- end -}}
{{- end -}}

{{/*
The identities mTLS pins: the sidecars let the operator's certificate name do operator-only calls and
the sidecars' own name stream and move groups between them, so one name must never be the other.
*/}}
{{- define "ghostserve.validateTls" -}}
{{- if include "ghostserve.mtls" . -}}
{{- with .Values.tls -}}
{{- if eq .sidecarServerName .operatorClientName -}}
{{- fail (printf "tls.sidecarServerName and tls.operatorClientName are both %q: every sidecar's certificate would be allowed the operator's calls on every node" .sidecarServerName) -}}
{{- end -}}
{{- if eq .sidecarSecretName .operatorSecretName -}}
{{- fail (printf "tls.sidecarSecretName and tls.operatorSecretName are both %q: the sidecars and the operator need different certificates" .sidecarSecretName) -}}
{{- end -}}
{{- if and (eq .mode "cert-manager") .certManager.issuerRef (not .certManager.issuerRef.name) -}}
{{- fail "tls.certManager.issuerRef needs a name (or leave it {} for a CA made for this release)" -}}
{{- end -}}
{{- end -}}
{{- end -}}
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
{{- if not (regexMatch "^[0-9]{1,9}(Ki|Mi|Gi|Ti)$" $q) -}}
{{- fail (printf "memory quantity %q: use a whole number of at most 9 digits with a Ki, Mi, Gi or Ti suffix" $q) -}}
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
