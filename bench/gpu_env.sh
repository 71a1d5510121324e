# Sourced by GPU call scripts from gpu_run21 on (the earlier ones are records of calls made and keep their own copy):
# multicast off, expandable segments, unbuffered output, and the carried wheels (WHEELS, default .whl) installed into
# /tmp/site.
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Once per set of wheels: jobs started side by side (gpu_run47) must not reinstall under each other's imports.
stamp=/tmp/site/.wheels-$(cd "${WHEELS:-.whl}" && ls *.whl | md5sum | cut -c1-12)
[ -f "$stamp" ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "${WHEELS:-.whl}"/*.whl 2>/dev/null && touch "$stamp"; } && export PYTHONPATH=/tmp/site:$PWD || exit 1
