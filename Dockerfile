# fluxtrain image: CUDA userspace from the torch wheel, NCCL/RDMA runtime bits, non-root user.
#   docker build -t fluxtrain:0.1.0 .
#   docker run --rm --gpus all --ipc=host --ulimit memlock=-1 -v /mnt/shared:/mnt/shared fluxtrain:0.1.0 \
#     torchrun --nproc_per_node 8 -m fluxtrain train --config configs/flux-dev.toml --train.output_dir /mnt/shared/runs/x
# (--ipc=host or --shm-size=16g: the default 64 MiB /dev/shm breaks DataLoader workers and NCCL.)
# The torch wheel ships its own CUDA/cuDNN/NCCL libraries, so a small CUDA "base" image suffices (it only adds
# the NVIDIA container-runtime settings); the host driver must support the wheel's CUDA. For older drivers
# rebuild with --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (etc.).
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_BASE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG USER_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python (+ headers and gcc: Triton/torch.compile build small C launchers at run time), RDMA userspace
# (libibverbs/rdma-core providers: NCCL dlopens them for InfiniBand/RoCE), numactl.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
      libibverbs1 ibverbs-providers librdmacm1 rdma-core numactl \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV" \
 && pip install --upgrade pip setuptools wheel

# torch first (its own layer: large, changes rarely), then the project.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"

WORKDIR /workspace
COPY pyproject.toml README.md* ./
COPY fluxtrain ./fluxtrain
RUN pip install . "torch==${TORCH_VERSION}" && python -c "import fluxtrain, torch; print(torch.__version__)"
COPY configs ./configs
COPY deploy ./deploy

# Non-root user; /workspace/runs is the default output/checkpoint dir (mount shared storage at /mnt/shared).
# ubuntu24.04 images ship a user "ubuntu" with uid 1000: drop it so the uid can be reused.
RUN (userdel -r ubuntu 2>/dev/null || true) \
 && groupadd --gid "${USER_UID}" fluxtrain \
 && useradd --create-home --uid "${USER_UID}" --gid "${USER_UID}" --shell /bin/bash fluxtrain \
 && mkdir -p /workspace/runs /mnt/shared \
 && chown -R fluxtrain:fluxtrain /workspace/runs /mnt/shared
# numeric, so that k8s runAsNonRoot can verify it
USER ${USER_UID}:${USER_UID}

# NCCL / PyTorch defaults; override with `docker run -e` or the pod env. NVLink SHARP (NCCL_NVLS_ENABLE) and the
# network selection (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) are left to NCCL's auto-detection on purpose.
ENV TORCH_NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_ASYNC_ERROR_HANDLING=1 \
    NCCL_DEBUG=WARN \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    OMP_NUM_THREADS=8 \
    HF_HOME=/mnt/shared/hf \
    FLUXTRAIN_CHECKPOINT_DIR=/workspace/runs \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Light health check: versions, GPUs, /dev/shm, a 16 MiB write to $FLUXTRAIN_CHECKPOINT_DIR; FAIL -> unhealthy.
HEALTHCHECK --interval=10m --timeout=2m --start-period=1m --retries=2 \
  CMD ["fluxtrain", "doctor", "--quick", "--write-mib", "16"]

CMD ["fluxtrain", "doctor", "--quick"]
