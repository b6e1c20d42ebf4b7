# Image for the operator and the sidecar (`ghostserve operator`, `ghostserve sidecar`).
# torch is not installed: neither process needs it (the codec's torch backend is imported lazily).
# The sidecar's CUDA codec needs the `gpu` extra (CuPy) on GPU nodes: build with --build-arg EXTRAS=gpu.
FROM python:3.11-slim AS build
ARG EXTRAS=""
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels kernels
COPY protos protos
COPY sidecar sidecar
COPY engine engine
COPY operator operator
COPY cli cli
RUN pip wheel --no-deps -w /wheels . \
 && pip wheel -w /wheels "$(ls /wheels/ghostserve-*.whl)${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim
RUN useradd --uid 1000 --user-group --no-create-home ghostserve
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 1000:1000
ENTRYPOINT ["ghostserve"]
