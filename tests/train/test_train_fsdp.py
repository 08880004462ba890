"""FSDP2 training (``torchrun --nproc_per_node 2 -m aimkp train ... --fsdp``, gloo on the CPU).

Two ranks with batch size 2 against one process with batch size 4 on the same global batches:
the same weights and stride tables for LoRA and full fine-tuning with AimKP (2 epochs, so the
second trains masked copies; thresholds set so that the filter rejects some of them) and for SFT.
LoRA dropout 0, so the one-process run (stash reweight) and the FSDP run (correction pass) weight
the same gradients. Tolerance: atol 2e-5 / rtol 1e-4 on the weights after 4 AdamW steps at lr 2e-3
(measured differences ~1e-6): the reduce-scatter sums the two ranks' gradients in another order
than one process's backward, and the correction pass adds ``(w - w0) G`` where one process
rescales ``G`` (float rounding only, amplified a little by Adam's normalisation).

Then: a run killed with SIGKILL (the whole process group) after a mid-epoch checkpoint resumes to
bit-identical weights; a rank that exits or hangs ends the run with one line and a non-zero status
within the ``--dist-timeout``.
"""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMON = [
    "train", "--preset", "tiny-llava", "--data", "default", "--max-train-samples", "8",
    "--epochs", "2", "--lr", "2e-3", "--no-eval", "--threads", "1", "--seed", "3",
    "--lora-dropout", "0",
]  # fmt: skip
# cosines of the tiny model's copies are high: these thresholds reject some text copies and
# every image copy in the second epoch
AIMKP = ["--method", "aimkp", "--tau-text", "0.9999", "--tau-image", "0.99"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(cmd: list[str], tmp: pathlib.Path, **env: str) -> subprocess.Popen:
    # own session: a test that SIGKILLs the process group kills nothing else
    return subprocess.Popen(
        cmd, cwd=tmp, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, ok: bool = True, timeout: float = 600) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    if ok:
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return proc.returncode, out + err


def _pair(tmp: pathlib.Path, name: str, args: list[str]) -> tuple[pathlib.Path, pathlib.Path]:
    """One process (batch 4) and two FSDP ranks (batch 2 each), run side by side."""
    one, two = tmp / f"{name}-one", tmp / f"{name}-two"
    p1 = _start([sys.executable, "-m", "aimkp", *COMMON, *args, "--batch-size", "4",
                 "--output", str(one)], tmp)  # fmt: skip
    p2 = _start([*TORCHRUN, "-m", "aimkp", *COMMON, *args, "--batch-size", "2", "--fsdp",
                 "--output", str(two)], tmp)  # fmt: skip
    _, log2 = _finish(p2)
    _finish(p1)
    assert log2.count("[aimkp train] done") == 1  # rank 0 reports, rank 1 does not
    assert "sharded over 2 ranks" in log2
    return one, two


def _weights(run: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = run / "last"
    name = "adapter_model.safetensors" if (last / "adapter_config.json").is_file() else None
    return load_file(str(last / (name or "model.safetensors")))


def _assert_same(one: pathlib.Path, two: pathlib.Path, exact: bool = False) -> None:
    w1, w2 = _weights(one), _weights(two)
    assert w1.keys() == w2.keys() and len(w1) > 20
    for k in w1:
        if exact:
            assert torch.equal(w2[k], w1[k]), k
        else:
            torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4, msg=k)


def _column(run: pathlib.Path, name: str) -> list[str]:
    rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines()]
    col = rows[0].index(name)
    return [r[col] for r in rows[1:]]


def _strides(run: pathlib.Path, rank: int | None = None) -> dict[str, torch.Tensor]:
    last = run / "last"
    if rank is None:
        return torch.load(last / "train_state.pt", weights_only=False)["strides"]
    return torch.load(last / f"rank-{rank}.pt", weights_only=False)["strides"]


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, pathlib.Path]:
    return _pair(tmp_path_factory.mktemp("lora"), "lora", AIMKP)


def test_lora_aimkp_matches_one_process(lora_pair: tuple[pathlib.Path, pathlib.Path]) -> None:
    one, two = lora_pair
    _assert_same(one, two)
    for key in ("text", "image"):  # the epoch's strides, reconciled over the ranks
        assert torch.equal(_strides(one)[key], _strides(two)[key])
    kept = _column(two, "text_kept_rate")
    assert kept == _column(one, "text_kept_rate") and 0 < float(kept[1]) < 1  # some rejected
    assert (
        float(_column(two, "image_kept_rate")[1]) == float(_column(one, "image_kept_rate")[1]) == 0
    )
    assert _column(two, "text_copies") == _column(one, "text_copies") == ["0", "8"]
    files = {p.name for p in (two / "last").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "dcp", "rank-1.pt"} <= files


def test_full_finetune_aimkp_matches_one_process(tmp_path: pathlib.Path) -> None:
    one, two = _pair(tmp_path, "full", [*AIMKP, "--full-finetune"])
    _assert_same(one, two)
    assert _column(two, "text_kept_rate") == _column(one, "text_kept_rate")


def test_sft_matches_one_process(tmp_path: pathlib.Path) -> None:
    one, two = _pair(tmp_path, "sft", ["--method", "sft"])
    _assert_same(one, two)


def test_resume_after_kill_is_bit_identical(
    lora_pair: tuple[pathlib.Path, pathlib.Path], tmp_path: pathlib.Path
) -> None:
    """SIGKILL of the whole group after step 3's mid-epoch checkpoint (of 4), then --resume."""
    _, whole = lora_pair
    run = tmp_path / "killed"
    args = [*COMMON, *AIMKP, "--batch-size", "2", "--fsdp", "--save-every", "1"]
    proc = _start([*TORCHRUN, str(ROOT / "tests/train/fsdp_fault.py"), *args,
                   "--output", str(run)], tmp_path, AIMKP_TEST_FAULT="kill:3")  # fmt: skip
    rc, log = _finish(proc, ok=False)
    assert rc == -9, log[-3000:]
    st = torch.load(run / "last" / "train_state.pt", weights_only=False)
    assert (st["step"], st["epoch"], st["epoch_step"]) == (3, 1, 1)
    _finish(_start([*TORCHRUN, "-m", "aimkp", "train", "--resume", str(run)], tmp_path))
    _assert_same(whole, run, exact=True)
    for rank in (0, 1):
        for key in ("text", "image"):
            assert torch.equal(_strides(whole, rank)[key], _strides(run, rank)[key])


def test_nonfinite_loss_on_one_rank_skips_the_step(tmp_path: pathlib.Path) -> None:
    """Rank 1's losses are NaN in step 2: its backward still runs (the ranks stay in lockstep),
    the global gradient is non-finite, both ranks skip that optimizer step, training goes on."""
    run = tmp_path / "nan"
    args = [*COMMON, *AIMKP, "--batch-size", "2", "--fsdp", "--epochs", "1"]
    proc = _start([*TORCHRUN, str(ROOT / "tests/train/fsdp_fault.py"), *args,
                   "--output", str(run)], tmp_path, AIMKP_TEST_FAULT="nan:2")  # fmt: skip
    _, log = _finish(proc)
    assert "non-finite loss under --fsdp" in log
    assert _column(run, "nonfinite_skipped_steps") == ["1"]
    assert int(_column(run, "nonfinite_rows")[0]) >= 1
    for k, w in _weights(run).items():
        assert bool(torch.isfinite(w).all()), k


@pytest.mark.parametrize("fault", ["exit", "hang"])
def test_lost_rank_ends_the_run(fault: str, tmp_path: pathlib.Path) -> None:
    """Rank 1 exits (status 1) or hangs after step 1: rank 0's next collective fails within
    --dist-timeout, it prints one line and exits 4; torchrun stops rank 1 and exits non-zero."""
    args = [*COMMON, "--method", "sft", "--batch-size", "2", "--fsdp", "--dist-timeout", "5"]
    proc = _start(
        [
            *TORCHRUN,
            str(ROOT / "tests/train/fsdp_fault.py"),
            *args,
            "--output",
            str(tmp_path / "run"),
        ],
        tmp_path,
        AIMKP_TEST_FAULT=f"{fault}:1",
    )
    rc, log = _finish(proc, ok=False, timeout=300)  # a hang would fail here, not pass
    assert rc != 0
    assert "aimkp train: error: rank 0: another rank died or did not answer within " in log
    assert "--dist-timeout 5 s" in log


def test_micro_batches_keep_the_ranks_in_lockstep() -> None:
    from aimkp.train.config import TrainConfig
    from aimkp.train.distributed import DataParallel, DistContext
    from aimkp.train.fsdp import FSDPParallel

    cfg = TrainConfig(fsdp=True)
    cpu = torch.device("cpu")
    # a global batch of 5 over 2 ranks: rank 0 gets 3 samples, rank 1 gets 2
    for rank, share in ((0, [0, 2, 4]), (1, [1, 3])):
        ctx = DistContext(rank=rank, world_size=2)
        got = list(FSDPParallel(cfg, ctx, cpu).micro_batches(share, 5, 2))
        want = [([0, 2], False), ([4], True)] if rank == 0 else [([1, 3], False), ([], True)]
        assert got == want
        assert list(DataParallel(cfg, ctx, cpu).micro_batches(share, 5, 2))[-1][1]
    assert len(list(DataParallel(cfg, DistContext(1, 2), cpu).micro_batches([1, 3], 5, 2))) == 1


def test_sharded_clip_is_clip_grad_norm() -> None:
    """One rank: the strategy's clip over (local) gradients equals torch's clip_grad_norm_."""
    from aimkp.train.config import TrainConfig
    from aimkp.train.distributed import DistContext
    from aimkp.train.fsdp import FSDPParallel

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn(3, 4)
        q.grad = p.grad.clone()
    par = FSDPParallel(TrainConfig(fsdp=True), DistContext(), torch.device("cpu"))
    finite, used = par.reduce_grads(a, 5)
    assert finite and used == 5
    norm = par.clip(a, 0.5)
    want = torch.nn.utils.clip_grad_norm_(b, 0.5)
    torch.testing.assert_close(norm, want)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    a[0].grad[0, 0] = math.inf
    assert par.reduce_grads(a, 5)[0] is False


def test_no_checkpoint_with_a_nonfinite_weight(tmp_path: pathlib.Path) -> None:
    """Every rank refuses alike, before anything is gathered or written."""
    from types import SimpleNamespace

    from aimkp.errors import NonFiniteError
    from aimkp.train.config import TrainConfig
    from aimkp.train.distributed import DistContext
    from aimkp.train.fsdp import FSDPParallel

    model = torch.nn.Linear(3, 2)
    run = SimpleNamespace(model=model, out=tmp_path)
    par = FSDPParallel(TrainConfig(fsdp=True), DistContext(), torch.device("cpu"))
    with torch.no_grad():
        model.weight[0, 1] = math.nan
    with pytest.raises(NonFiniteError, match="1 value"), par.consolidated(run):  # type: ignore[arg-type]
        pass
    assert list(tmp_path.iterdir()) == []


def test_fsdp_refuses_stash_and_baselines() -> None:
    from aimkp.errors import UsageError
    from aimkp.train.config import TrainConfig

    with pytest.raises(UsageError, match="--reweight correction"):
        TrainConfig(fsdp=True, reweight="stash").validate()
    with pytest.raises(UsageError, match="--baselines"):
        TrainConfig(fsdp=True, baselines=True).validate()
    assert TrainConfig(fsdp=True).resolved_reweight == "correction"
    assert TrainConfig().resolved_reweight == "auto"


def test_fsdp_lora_dropout_zero_by_default_refused_when_asked() -> None:
    """--fsdp weights the copies by the correction pass, exact only without dropout: the default
    LoRA dropout becomes 0 (said once), a dropout the user gave is refused."""
    from aimkp.errors import UsageError
    from aimkp.train.config import TrainConfig

    cfg = TrainConfig(fsdp=True)
    assert cfg.lora_dropout > 0 and cfg.resolved_lora_dropout == 0.0
    assert any("LoRA dropout 0" in w for w in cfg.check_consistency("cpu", given=set()))
    with pytest.raises(UsageError, match="--fsdp with --lora-dropout 0.1"):
        TrainConfig(fsdp=True, lora_dropout=0.1).check_consistency("cpu", given={"lora_dropout"})
    for unchanged in (TrainConfig(), TrainConfig(fsdp=True, method="sft"),
                      TrainConfig(fsdp=True, full_finetune=True)):  # fmt: skip
        assert unchanged.resolved_lora_dropout == unchanged.lora_dropout
    quiet = TrainConfig(fsdp=True, lora_dropout=0.0).check_consistency("cpu", given=set())
    assert not any("dropout" in w for w in quiet)


def test_units_gather_in_the_frozen_base_dtype() -> None:
    """The mixed-precision policy's param_dtype: the frozen base's half dtype (--dtype), bf16
    with --bf16 on CUDA, else none (fp32 weights gathered as they are)."""
    from aimkp.train.fsdp import compute_dtype

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype(model, True, cpu) is None
    assert compute_dtype(model, True, cuda) is torch.bfloat16
    model[0].to(torch.float16)
    assert compute_dtype(model, False, cpu) is torch.float16
