"""Deployment files: Dockerfile, Slurm scripts, Kubernetes manifests, accelerate config.

Nothing here needs Docker, Slurm or a cluster: YAML is parsed and checked for the fields that make multi-node
training work, shell scripts go through `bash -n` and shellcheck, and the Slurm requeue logic runs against fake
srun/scontrol/scancel/torchrun commands.
"""

from __future__ import annotations

import copy
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SLURM = DEPLOY / "slurm"
SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "build", "dist", "runs", "data"}


def _files(*suffixes: str, root: Path = DEPLOY) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if f.endswith(suffixes)]
    return sorted(out)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind]
    assert len(found) == 1, f"{path.name}: expected one {kind}, found {len(found)}"
    return found[0]


def _check_pod(spec: dict, where: str) -> dict:
    """8 GPUs, requests == limits (Guaranteed QoS), /dev/shm in memory, shared PVC at /mnt/shared."""
    (c,) = [c for c in spec["containers"] if "nvidia.com/gpu" in c["resources"].get("limits", {})]
    res = c["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == 8, where
    assert res["requests"] == res["limits"], f"{where}: requests must equal limits (Guaranteed QoS)"
    assert {"cpu", "memory"} <= set(res["limits"]), where
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    shm = vols[mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory", where
    shared = vols[mounts["/mnt/shared"]]
    assert shared["persistentVolumeClaim"]["claimName"] == _pvc()["metadata"]["name"], where
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    assert env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "1", where
    assert "NCCL_NVLS_ENABLE" not in env, where
    return c


def _pvc() -> dict:
    return _one(K8S / "base" / "pvc.yaml", "PersistentVolumeClaim")


# ------------------------------------------------------------------------------------------------ YAML


def test_every_yaml_parses():
    paths = _files(".yaml", ".yml")
    assert any(p.parent == K8S / "base" for p in paths) and (DEPLOY / "accelerate" / "fsdp.yaml") in paths
    for p in paths:
        assert _docs(p), p


def test_pvc_is_shared():
    pvc = _pvc()
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_pytorchjob():
    job = _one(K8S / "base" / "pytorchjob.yaml", "PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    spec = job["spec"]
    ep = spec["elasticPolicy"]
    assert ep["rdzvBackend"] == "c10d"
    assert ep["maxRestarts"] >= 1
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert ep["minReplicas"] <= worker["replicas"] <= ep["maxReplicas"]
    assert str(spec["nprocPerNode"]) == "8"
    c = _check_pod(worker["template"]["spec"], "PyTorchJob")
    # the training operator finds the container and the rendezvous port by these names
    assert c["name"] == "pytorch"
    assert any(p["name"] == "pytorchjob-port" for p in c["ports"])
    args = c["command"] + c["args"]
    assert args[0] == "torchrun" and "--nproc-per-node=8" in args
    i = args.index("-m")
    assert args[i + 1: i + 5] == ["fluxtrain", "train", "--config", "configs/flux-dev.toml"]
    _check_train_overrides(args[i + 5:])


def _check_train_overrides(argv: list[str]) -> None:
    """The template's overrides are valid ones, and data.path names shards: a folder was refused by every rank."""
    from fluxtrain import config as C

    over = C.parse_overrides(argv)
    path = over.get("data", {}).get("path", "")
    assert path.endswith(".tar") and ("*" in path or "{" in path), path


def test_indexed_job_and_headless_service():
    path = K8S / "indexed-job.yaml"
    svc, job = _one(path, "Service"), _one(path, "Job")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": name}
    c = _check_pod(pod, "indexed Job")
    script = "\n".join(c["args"])
    assert "JOB_COMPLETION_INDEX" in script
    assert f"--rdzv-endpoint={name}-0.{svc['metadata']['name']}:" in script
    assert "--rdzv-backend=c10d" in script and "--max-restarts=" in script
    assert "-m fluxtrain train --config" in script
    train = shlex.split(script.split("-m fluxtrain train --config configs/flux-dev.toml", 1)[1].replace("\\\n", " "))
    _check_train_overrides(train)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert int(env["NNODES"]) == spec["completions"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def _apply_json6902(doc: dict, ops: list[dict]) -> dict:
    doc = copy.deepcopy(doc)
    for op in ops:
        assert op["op"] == "replace", op
        *parents, last = op["path"].strip("/").split("/")
        node = doc
        for key in parents:
            node = node[key]
        assert last in node, f"patch path {op['path']} not in the base"
        node[last] = op["value"]
    return doc


def test_kustomize_base_and_overlay():
    top = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert top["resources"] == ["base"]
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    for r in base["resources"]:
        assert (K8S / "base" / r).is_file(), r
    overlay_dir = K8S / "overlays" / "nodes-4"
    overlay = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    assert [(overlay_dir / r).resolve() for r in overlay["resources"]] == [(K8S / "base").resolve()]
    job = _one(K8S / "base" / "pytorchjob.yaml", "PyTorchJob")
    (patch,) = overlay["patches"]
    assert patch["target"]["kind"] == "PyTorchJob" and patch["target"]["name"] == job["metadata"]["name"]
    patched = _apply_json6902(job, yaml.safe_load(patch["patch"]))
    ep = patched["spec"]["elasticPolicy"]
    assert patched["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    assert ep["minReplicas"] <= 4 <= ep["maxReplicas"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
def test_kubectl_kustomize_builds():
    for target, replicas in ((K8S, 2), (K8S / "overlays" / "nodes-4", 4)):
        out = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "PyTorchJob"}
        (job,) = [d for d in docs if d["kind"] == "PyTorchJob"]
        assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == replicas


# --------------------------------------------------------------------------------------------- accelerate


ACCEL = DEPLOY / "accelerate" / "fsdp.yaml"


def test_accelerate_config_schema():
    accel = pytest.importorskip("accelerate.commands.config.config_args")
    cfg = accel.load_config_from_file(str(ACCEL))  # rejects unknown keys
    assert cfg.distributed_type.value == "FSDP"
    assert cfg.mixed_precision == "bf16"
    f = cfg.fsdp_config
    assert f["fsdp_version"] == 2
    assert f["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert f["fsdp_reshard_after_forward"] is True
    assert f["fsdp_offload_params"] is False
    assert f["fsdp_activation_checkpointing"] is True
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_transformer_layer_cls_to_wrap"] == "FluxTransformerBlock,FluxSingleTransformerBlock"


def test_accelerate_launch_exports_env():
    """What `accelerate launch --config_file deploy/accelerate/fsdp.yaml` hands the trainer (no processes started)."""
    launch = pytest.importorskip("accelerate.commands.launch")
    from accelerate.utils.launch import prepare_multi_gpu_env

    parser = launch.launch_command_parser()
    args = parser.parse_args(["--config_file", str(ACCEL), "-m", "fluxtrain", "train", "--config", "c.toml"])
    args, _, _ = launch._validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert args.num_processes == 2
    want = {"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
            "FSDP_SHARDING_STRATEGY": "FULL_SHARD", "FSDP_RESHARD_AFTER_FORWARD": "true",
            "FSDP_OFFLOAD_PARAMS": "false", "FSDP_ACTIVATION_CHECKPOINTING": "true",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "FluxTransformerBlock,FluxSingleTransformerBlock",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT"}
    assert {k: env.get(k) for k in want} == want
    # accelerate exports the accumulation steps only for DeepSpeed: fluxtrain takes --gradient_accumulation_steps
    if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in os.environ:
        assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env


# ------------------------------------------------------------------------------------------- shell / Slurm


SHELL_FILES = _files(".sh", ".sbatch")  # the deployment scripts (deploy/**)


def test_slurm_scripts_exist():
    assert {p.name for p in SHELL_FILES} >= {"train.sbatch", "train-srun.sbatch"}


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(path):
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck binary not installed (apt-get install shellcheck); CI installs it")
@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(path):
    out = subprocess.run(["shellcheck", "--shell=bash", "--external-sources", str(path)], capture_output=True,
                         text=True, cwd=path.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def test_train_sbatch_contents():
    s = (SLURM / "train.sbatch").read_text()
    for needle in ("#SBATCH --signal=B:USR1@300", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                   "scontrol show hostnames", "--rdzv_backend c10d", "--rdzv_endpoint", "--max-restarts",
                   "SIGUSR1", "trap forward_usr1 USR1", 'scontrol requeue "$SLURM_JOB_ID"', "%N",
                   "-m fluxtrain train --config"):
        assert needle in s, needle
    assert "TORCHRUN=${TORCHRUN:-torchrun}" in s


def test_train_srun_sbatch_contents():
    s = (SLURM / "train-srun.sbatch").read_text()
    for needle in ("#SBATCH --ntasks-per-node=8", "#SBATCH --signal=B:USR1@300", "MASTER_ADDR", "MASTER_PORT",
                   "scontrol show hostnames", "trap forward_usr1 USR1", 'scontrol requeue "$SLURM_JOB_ID"',
                   '"$PYTHON" -m fluxtrain train --config'):
        assert needle in s, needle
    assert "torchrun" not in s.split("set -euo pipefail", 1)[1]


FAKE = {
    # srun: drop its own options, run the command once (as if one node)
    "srun": """#!/usr/bin/env bash
while [[ $# -gt 0 && ( $1 == -* ) ]]; do
  case $1 in -o|-e|-c|-n|-N) shift 2 ;; *) shift ;; esac
done
exec "$@"
""",
    "scontrol": """#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-a01\\ngpu-a02\\n'; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
""",
    "scancel": """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_LOG"
kill -USR1 "$(cat "$FAKE_DIR/trainer.pid")"
""",
    # stands in for torchrun (train.sbatch) and python (train-srun.sbatch): record argv and env, checkpoint on USR1
    "trainer": """#!/usr/bin/env bash
echo "argv $*" >> "$FAKE_LOG"
echo "env MASTER_ADDR=${MASTER_ADDR:-} HEAD_NODE=${HEAD_NODE:-}" >> "$FAKE_LOG"
trap 'echo "trainer got USR1, checkpointing" >> "$FAKE_LOG"; exit 0' USR1
echo $$ > "$FAKE_DIR/trainer.pid"
for _ in $(seq 600); do sleep 0.1; done
echo "trainer timed out" >> "$FAKE_LOG"; exit 3
""",
}


@pytest.mark.skipif(sys.platform != "linux", reason="needs bash and POSIX signals")
@pytest.mark.parametrize("script", ["train.sbatch", "train-srun.sbatch"])
def test_slurm_preemption_requeue(tmp_path, script):
    """SIGUSR1 to the batch script -> trainer gets SIGUSR1 (checkpoints) -> job requeued, exit 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), FAKE_DIR=str(tmp_path),
               TORCHRUN=str(bin_dir / "trainer"), FLUXTRAIN_PYTHON=str(bin_dir / "trainer"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
               SLURM_CPUS_ON_NODE="16", SLURM_NTASKS="16", SLURM_CPUS_PER_TASK="2")
    proc = subprocess.Popen(["bash", str(SLURM / script), "configs/flux-dev.toml", "--train.steps", "10"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "trainer.pid").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "trainer never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, out + text
    assert "trainer got USR1, checkpointing" in text, out + text
    assert "scancel --signal=USR1 4242" in text
    assert "scontrol requeue 4242" in text
    assert (tmp_path / "logs").is_dir()
    argv = next(ln for ln in text.splitlines() if ln.startswith("argv "))
    if script == "train.sbatch":
        assert "env MASTER_ADDR= HEAD_NODE=gpu-a01" in text
        for piece in ("--nnodes 2:2", "--nproc_per_node 8", "--rdzv_backend c10d", "--rdzv_endpoint gpu-a01:29400",
                      "--rdzv_id 4242", "--max-restarts 3", "SIGUSR1", "--shutdown-timeout 240",
                      "-m fluxtrain train --config configs/flux-dev.toml --train.steps 10"):
            assert piece in argv, (piece, argv)
    else:
        assert "env MASTER_ADDR=gpu-a01" in text
        assert argv.endswith("-m fluxtrain train --config configs/flux-dev.toml --train.steps 10")


def test_slurm_exit_code_passes_through_without_preemption(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE.items():
        (bin_dir / name).write_text(body if name != "trainer" else "#!/usr/bin/env bash\nexit 7\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"),
               FAKE_DIR=str(tmp_path), TORCHRUN=str(bin_dir / "trainer"), SLURM_JOB_ID="1",
               SLURM_JOB_NODELIST="n1", SLURM_JOB_NUM_NODES="1")
    out = subprocess.run(["bash", str(SLURM / "train.sbatch"), "c.toml"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 7, out.stdout + out.stderr
    assert not (tmp_path / "log").exists() or "requeue" not in (tmp_path / "log").read_text()


# ------------------------------------------------------------------------------------------------- Docker


def test_dockerfile():
    s = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in s.splitlines()]
    assert any(ln.startswith("FROM ") for ln in lines)
    assert any(ln.startswith("ARG TORCH_VERSION=2.") for ln in lines), "torch must be pinned"
    assert 'torch==${TORCH_VERSION}' in s and "pip install ." in s
    users = [ln.split(None, 1)[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must run as a non-root user"
    assert "HEALTHCHECK" in s and '"doctor", "--quick"' in s
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in s
    assert "NCCL_NVLS_ENABLE=" not in s
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignore)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed")
def test_hadolint():
    out = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
