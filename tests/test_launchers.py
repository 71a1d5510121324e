"""Launch paths: the guide's flags, `accelerate launch` with the shipped FSDP config, Slurm variables without
torchrun, and two torchrun "nodes" on localhost with c10d rendezvous and HYBRID_SHARD."""

import re
import subprocess
import sys

import pytest

from tests.helpers import FAST, ROOT, env, free_port, losses, torchrun

EXACT = 1e-5
RUN = ["-m", "fluxtrain", "train", "--config", "configs/tiny.toml", *FAST]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = torchrun(2, [*RUN, "--train.output_dir", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_guide_command_line(tmp_path, reference):
    # train_flux1dev.py-style flags; fp32 so that it must equal the reference exactly
    res = torchrun(2, [*RUN, "--use_fsdp", "--mixed_precision", "fp32", "--gradient_accumulation_steps", "2",
                       "--train.batch_size", "1", "--train.output_dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    got, ref = losses(tmp_path), losses(reference)
    assert all(abs(got[s] - ref[s]) <= EXACT * ref[s] for s in ref)


def test_slurm_variables_without_torchrun(tmp_path, reference):
    port = free_port()
    procs = []
    for rank in range(2):
        e = env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_NTASKS_PER_NODE="2",
                SLURM_JOB_ID="4242", SLURM_STEP_ID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # as srun
        procs.append(subprocess.Popen([sys.executable, *RUN, "--train.output_dir", str(tmp_path)], cwd=ROOT, env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:]
    got, ref = losses(tmp_path), losses(reference)
    assert all(abs(got[s] - ref[s]) <= EXACT * ref[s] for s in ref)


def test_two_nodes_on_localhost_hybrid_shard(tmp_path, reference):
    """--nnodes 2 × 2 processes, c10d rendezvous; HYBRID_SHARD replicates across the "nodes" and shards within."""
    port = free_port()
    args = [*RUN, "--parallel.strategy", "HYBRID_SHARD", "--train.batch_size", "1",
            "--train.output_dir", str(tmp_path)]
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
               f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=t2n",
               *args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:] + outs[1][1][-3000:]
    # 4 ranks × 1 sample = the reference's 2 ranks × 2 samples, same global batch
    got, ref = losses(tmp_path), losses(reference)
    assert all(abs(got[s] - ref[s]) <= EXACT * ref[s] for s in ref)


def test_accelerate_launch_with_the_shipped_fsdp_config(tmp_path, reference):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "deploy/accelerate/fsdp.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()),
           *RUN, "--train.output_dir", str(tmp_path), "--parallel.mixed_precision", "fp32"]
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import tomllib

    resolved = tomllib.loads((tmp_path / "config.toml").read_text())
    # the accelerate config's activation checkpointing reached the trainer; explicit overrides still win
    assert resolved["parallel"]["activation_checkpointing"] == "full"
    assert resolved["parallel"]["strategy"] == "FULL_SHARD"
    got, ref = losses(tmp_path), losses(reference)
    assert all(abs(got[s] - ref[s]) <= EXACT * ref[s] for s in ref)


@pytest.mark.parametrize("variables, said", [
    # each hung in silence: the ranks waited for peers that were never started, or looked the address up forever
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost"}, "not started by srun"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29611"}, "rank 2, local rank 2 of "
                                                                                         "world 2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "29555"},
     "MASTER_ADDR = 'no-such-host.invalid' does not resolve"),
    # tracebacks, or a lone rank 0
    ({"RANK": "abc", "WORLD_SIZE": "1"}, "RANK = 'abc' is not a whole number"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"}, "MASTER_PORT = 'abc'"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not set"),
    ({"RANK": "1"}, "RANK and WORLD_SIZE go together"),
])
def test_a_launch_environment_that_cannot_work_is_one_line(monkeypatch, variables, said):
    from fluxtrain.config import ConfigError
    from fluxtrain.parallel.mesh import launch_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEPID", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in variables.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(said)):
        launch_env()
