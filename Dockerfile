# Image for the operator, the sidecar and the resume gateway (`ghostserve operator|sidecar|gateway`).
# torch is not installed: none of them needs it (the codec's torch backend is imported lazily).
# Dependencies are the pinned set of constraints.txt. The sidecar's CUDA codec needs the `gpu` extra
# (CuPy) on GPU nodes: build with --build-arg EXTRAS=sidecar,operator,gateway,gpu.
FROM python:3.11-slim AS build
ARG EXTRAS="sidecar,operator,gateway"
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY kernels kernels
COPY protos protos
COPY wire wire
COPY sidecar sidecar
COPY engine engine
COPY operator operator
COPY gateway gateway
COPY cluster cluster
COPY cli cli
RUN pip wheel --no-deps -w /wheels . \
 && pip wheel -c constraints.txt -w /wheels "$(ls /wheels/ghostserve-*.whl)${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
RUN useradd --uid 1000 --user-group --no-create-home ghostserve
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
USER 1000:1000
ENTRYPOINT ["ghostserve"]
