# syntax=docker/dockerfile:1.10
# Stable Diffusion 1.5 worker for RunPod serverless.
#
#   docker build -t sd15-worker .                       # "full": SD 1.5 baked into /models/sd15
#   docker build --target slim -t sd15-worker:slim .    # "slim": no weights; MODEL_DIR on a network volume
#   docker build --build-arg SAFETY_CHECKER=true ...    # bake and load the safety checker too
#   docker build --secret id=hf_token,env=HF_TOKEN ...  # only for gated or private models
#   docker build --build-arg MODEL_URL=https://... [--build-arg MODEL_SHA256=...] [--build-arg VAE_URL=...] \
#     [--secret id=civitai_token,env=CIVITAI_TOKEN] .    # a single-file checkpoint, converted once at build;
#                                                       # each URL gets its own host's token only: hf_token,
#                                                       # civitai_token, download_tokens (host=token,...)
#   docker build --build-arg CONTROLNETS=lllyasviel/control_v11p_sd15_canny,lllyasviel/control_v11f1p_sd15_depth .
#                                                       # and ControlNets (hub ids or .safetensors URLs), float16,
#                                                       # baked into /models/controlnets and served from there
#   docker build --build-arg \
#     UPSCALERS=https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth .
#                                                       # and upscalers (URLs of .pth files, read as tensors only,
#                                                       # or .safetensors), checked as the worker reads them,
#                                                       # baked into /models/upscalers and served from there
ARG PYTHON_VERSION=3.11

# --- deps: a virtual environment with torch and the requirements, built once and copied ---------
FROM python:${PYTHON_VERSION}-slim-bookworm AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first (with torchvision, for spandrel), in a layer of its own (several GB, rarely changes), from
# PyTorch's CUDA 12.6 index: the cu126 builds are the last with Pascal (sm_61, GTX 1060) kernels, and they run
# Volta, Turing, Ampere, Ada and Hopper too. The wheel brings its CUDA libraries; the host
# brings only the driver.
RUN pip install torch==2.13.0 torchvision==0.28.0 --index-url https://download.pytorch.org/whl/cu126
COPY requirements.txt requirements-nodeps.txt /tmp/
RUN pip install -r /tmp/requirements.txt && pip install --no-deps -r /tmp/requirements-nodeps.txt

# --- app: the worker's code on a slim base --------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HOME=/tmp/hf-home \
    MODEL_DIR=/models/sd15
COPY --from=deps /opt/venv /opt/venv
# FAST_MODE's compiler: Triton builds the launchers of the kernels torch.compile makes with a C compiler, at run
# time; without one, FAST_MODE's compile fails (the worker then serves uncompiled and says so in its log).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY handler.py test_input.json ./
COPY src/ src/
COPY builder/ builder/
# Healthy while the worker (PID 1) runs. It reads /proc only: a GPU check would open a CUDA
# context next to a worker that may fill the card. `python -m builder.selfcheck` checks the GPU.
HEALTHCHECK --interval=1m --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-m", "builder.selfcheck", "--liveness"]
CMD ["python", "-u", "handler.py"]

# --- slim: no weights in the image; bake them once into a network volume (see the README) ---------
FROM app AS slim
ENV MODEL_DIR=/runpod-volume/models/sd15

# --- full (default): SD 1.5 baked in at build time, loaded offline at run time ---------------------
# MODEL_URL instead bakes a single-file checkpoint (Civitai, a bucket), converted once into /models/sd15.
# Empty arguments leave the settings at their defaults (MODEL_ID: SD 1.5 at its pinned revision).
FROM app AS full
ARG BAKE_MODEL=true
ARG MODEL_ID=
ARG MODEL_REVISION=
ARG MODEL_URL=
ARG MODEL_SHA256=
ARG VAE_URL=
ARG VAE_SHA256=
ARG SAFETY_CHECKER=false
ARG CONTROLNETS=
ARG UPSCALERS=
# The worker reads the same variables, so it serves what the build baked and nothing else. URLs stay out
# of the image's environment (a query may hold a token): the build reads MODEL_URL, VAE_URL (and
# VAE_SHA256, which needs it), CONTROLNETS and UPSCALERS as arguments, and the worker learns what was
# baked from /models/sd15/source.json and the files in /models/controlnets and /models/upscalers.
# Without CONTROLNETS, CONTROLNET_DIR is empty, which the worker reads as unset: ControlNet is off;
# without UPSCALERS, UPSCALER_DIR is empty too: no upscaler is served.
ENV MODEL_ID=${MODEL_ID} \
    MODEL_REVISION=${MODEL_REVISION} \
    MODEL_SHA256=${MODEL_SHA256} \
    SAFETY_CHECKER=${SAFETY_CHECKER} \
    CONTROLNET_DIR=${CONTROLNETS:+/models/controlnets} \
    UPSCALER_DIR=${UPSCALERS:+/models/upscalers}
# The weights go to /models/sd15 (ControlNets to /models/controlnets, upscalers to /models/upscalers), not
# HF_HOME, which a network volume at /runpod-volume could hide. Hub repos are downloaded into a build cache,
# outside the image, and copied out: a rebuild after a code change copies them from there instead of downloading
# them again. A checkpoint, ControlNet or upscaler file download lands in the same cache, where a failed build's
# part of the same URL is resumed; one build at a time uses it.
# Each token is a secret, never an argument, and goes only to its own host. BAKE_MODEL is true or false, nothing
# else; false bakes nothing, so it refuses the arguments only the bake reads rather than drop them.
RUN --mount=type=secret,id=hf_token,env=HF_TOKEN \
    --mount=type=secret,id=civitai_token,env=CIVITAI_TOKEN \
    --mount=type=secret,id=download_tokens,env=DOWNLOAD_TOKENS \
    --mount=type=secret,id=download_token,env=DOWNLOAD_TOKEN \
    --mount=type=cache,target=/models/.downloads,sharing=locked \
    case "$BAKE_MODEL" in \
      true) python -m builder.cache_model --hub-cache /models/.downloads/hub ;; \
      false) set --; \
        [ -z "$MODEL_URL" ] || set -- "$@" MODEL_URL; \
        [ -z "$VAE_URL" ] || set -- "$@" VAE_URL; \
        [ -z "$VAE_SHA256" ] || set -- "$@" VAE_SHA256; \
        [ -z "$CONTROLNETS" ] || set -- "$@" CONTROLNETS; \
        [ -z "$UPSCALERS" ] || set -- "$@" UPSCALERS; \
        if [ "$#" -gt 0 ]; then \
          echo "BAKE_MODEL=false bakes nothing, and $* would only be read by the bake:" \
            "set BAKE_MODEL=true, or leave them out" >&2; \
          exit 1; \
        fi ;; \
      *) echo "BAKE_MODEL='$BAKE_MODEL': must be true (bake the model) or false (bake nothing)" >&2; exit 1 ;; \
    esac
