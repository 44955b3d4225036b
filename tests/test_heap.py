"""keep_freed_memory: freed CPU memory is reused inside the block, handed back after, and user choices win."""

import pytest

from adaptune import keep_freed_memory
from adaptune.cpu import heap

glibc_only = pytest.mark.skipif(heap._glibc() is None, reason="needs glibc's own malloc, untuned")


# Run in a fresh interpreter: how glibc treats freed memory outside the block depends on what the
# process did before (its adaptive thresholds, what else lies on the heap).
_PROBE = r"""
import ctypes, json, resource, torch
from adaptune import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_apart():  # bytes glibc holds in separate mmap regions (given back to the kernel on free)
    return libc.mallinfo2().hblkhd

def churn_faults(rounds=3):
    # allocate, write and free 96 MiB as 24 MiB tensors (an activation-sized churn), after a few
    # warm-up rounds (the heap's layout settles)
    def churn():
        blocks = [torch.ones(6 << 20) for _ in range(4)]
        del blocks
    for _ in range(4):
        churn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        churn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

def mapped_for(mib):
    before = mapped_apart()
    t = torch.ones(mib << 18)
    return mapped_apart() - before

out = {"mapped_default": mapped_for(28)}  # a fresh process maps a 28 MiB block apart
with keep_freed_memory() as applied:
    out["applied"] = applied
    with keep_freed_memory() as inner:
        out["inner_applied"] = inner
    # (after the inner block ended) larger than any block freed so far, and more than the heap has
    # free: glibc's own rule would map it apart
    out["mapped_inside"] = mapped_for(30)
    out["inside"] = churn_faults()
    blocks = [torch.ones(6 << 20) for _ in range(8)]  # 192 MiB, kept once freed
    del blocks
    out["rss_kept"] = rss_kib()
out["rss_after"] = rss_kib()
print(json.dumps(out))
"""


@glibc_only
def test_freed_memory_is_reused_inside_and_handed_back_after():
    import json
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["applied"] and out["inner_applied"]
    # glibc's default puts a large block in its own mapping, unmapped (and faulted in anew) each
    # time; inside the block it comes from the heap, which keeps it (the inner block's end changed nothing)
    assert out["mapped_default"] >= 28 << 20, out
    assert out["mapped_inside"] == 0, out
    # 3 rounds x 96 MiB = 73,728 pages written; the kept memory takes them without page faults
    assert out["inside"] < 2_000, out
    assert out["rss_kept"] - out["rss_after"] > 100 << 10, out  # leaving gave > 100 MiB back


@pytest.mark.parametrize(
    "env",
    [
        {"ADAPTUNE_KEEP_FREED_MEMORY": "0"},
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
        {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
    ],
)
def test_user_choices_and_other_allocators_are_left_alone(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with keep_freed_memory() as applied:
        assert not applied


def test_library_train_leaves_the_setting_to_its_caller(monkeypatch, tmp_path):
    """adaptune.training.train.train does not open the block itself (a process-wide setting is the caller's
    choice); inside a caller's block it runs in it."""
    import adaptune.training.train as train_mod

    monkeypatch.setattr(heap, "_glibc", lambda: None)  # only the wrapping is checked: leave this process's malloc be
    seen = []

    def fake_train(cfg, out, resume, quiet, dd, on_step=None):
        seen.append(heap._depth)
        return {}

    monkeypatch.setattr(train_mod, "_train", fake_train)
    train_mod.train(train_mod.TrainConfig(limit_train=8), tmp_path / "run")
    assert seen == [heap._depth]
    with keep_freed_memory():
        train_mod.train(train_mod.TrainConfig(limit_train=8), tmp_path / "run2")
    assert seen[-1] == heap._depth + 1


def test_cli_commands_run_inside_the_block(monkeypatch):
    from adaptune.cli import adapter_commands
    from adaptune.cli import parser as cli

    monkeypatch.setattr(heap, "_glibc", lambda: None)
    seen = []
    monkeypatch.setattr(adapter_commands, "params", lambda args: seen.append(heap._depth) or 0)
    assert cli.main(["params"]) == 0
    assert seen == [heap._depth + 1]


@glibc_only
def test_a_child_forked_inside_starts_outside():
    import os

    with keep_freed_memory():
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the parent's cleanup
            os.write(write, f"{heap._depth} {heap._libc is None}".encode())
            os._exit(0)
        os.close(write)
        reported = os.read(read, 100).decode()
        os.waitpid(pid, 0)
        os.close(read)
        assert heap._depth >= 1  # the parent is still inside
    assert reported == "0 True"


def test_batched_inference_leaves_the_setting_to_its_caller(monkeypatch):
    """Predictor.predict and evaluation (through train.evaluate) do not open the block themselves."""
    from conftest import tiny_model

    from adaptune.training.train import evaluate

    monkeypatch.setattr(heap, "_glibc", lambda: None)
    model = tiny_model("bert")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(heap._depth))
    encoded = [{"input_ids": [1, 5, 6, 2], "attention_mask": [1, 1, 1, 1], "label": 0}] * 3
    evaluate(model, encoded, task_type="classification", num_labels=2, batch_size=2, pad_id=0, device="cpu")
    assert seen and set(seen) == {heap._depth}


_PROBE_RETURN = r"""
import contextlib, json, sys, torch
from adaptune.cpu.heap import return_freed_memory

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

out = {}
with return_freed_memory() if sys.argv[1] == "return" else contextlib.nullcontext(None) as applied:
    out["applied"] = applied
    big = torch.ones(28 << 18); del big  # glibc's own rule: blocks up to 28 MiB now come from the heap
    before = rss_kib()
    blocks = [torch.ones(3 << 18) for _ in range(64)]  # 192 MiB of 3 MiB blocks
    out["held"] = rss_kib() - before
    del blocks[::2]  # every other one freed: holes between live blocks, as activations leave them
    out["kept"] = rss_kib() - before
print(json.dumps(out))
"""


@glibc_only
def test_return_freed_memory_gives_freed_blocks_back_at_once():
    """Half of 64 blocks of 3 MiB freed between live ones: glibc alone keeps the holes in the process
    (192 MiB resident for 96 MiB of live tensors); inside return_freed_memory they leave it."""
    import json
    import subprocess
    import sys

    out = {}
    for mode in ("default", "return"):
        run = subprocess.run([sys.executable, "-c", _PROBE_RETURN, mode], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        out[mode] = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["return"]["applied"] and out["default"]["applied"] is None
    assert all(o["held"] > 150 << 10 for o in out.values()), out
    assert out["default"]["kept"] > 180 << 10, out  # glibc alone: the holes stay in its heap
    assert out["return"]["kept"] < 110 << 10, out  # mapped apart, unmapped when freed: the live 96 MiB


@pytest.mark.parametrize(
    "flags, chosen",
    [
        ([], "keep_freed_memory"),
        (["--gradient-checkpointing"], "return_freed_memory"),
        (["--quantize", "int8"], "return_freed_memory"),
    ],
)
def test_the_command_line_returns_freed_memory_when_a_run_saves_memory(monkeypatch, flags, chosen):
    """`adaptune train` keeps freed memory for speed, but a run that asks to save memory
    (--gradient-checkpointing, --quantize) gives freed blocks back at once."""
    import contextlib

    from adaptune.cli import commands
    from adaptune.cli.parser import main

    used = []

    def recorder(name):
        @contextlib.contextmanager
        def block(give_back=True):
            used.append(name)
            yield False

        return block

    monkeypatch.setattr(heap, "keep_freed_memory", recorder("keep_freed_memory"))
    monkeypatch.setattr(heap, "return_freed_memory", recorder("return_freed_memory"))
    monkeypatch.setattr(commands, "train", lambda args: 0)
    assert main(["train", "--data", "x.csv", "-o", "unused", *flags]) == 0
    assert used == [chosen]


def test_leaving_return_freed_memory_restores_the_fixed_thresholds(monkeypatch):
    """Leaving the block puts back the 32 MiB mmap and 64 MiB trim thresholds (glibc cannot return
    to its adaptive ones); a block of the other kind nested inside applies nothing and says so."""
    calls = []

    class FakeLibc:
        def mallopt(self, what, value):
            calls.append((what, value))
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(heap, "_glibc", lambda: FakeLibc())
    with heap.return_freed_memory() as outer:
        assert outer and calls == [(heap._M_MMAP_THRESHOLD, 1 << 20), (heap._M_TRIM_THRESHOLD, heap._TRIM_AFTER)]
        with keep_freed_memory() as inner:
            assert not inner  # the outer block's setting holds
        with heap.return_freed_memory() as same:
            assert same
        assert len(calls) == 2  # nested blocks changed nothing
    assert calls[2:] == [
        (heap._M_MMAP_THRESHOLD, heap._MMAP_THRESHOLD),
        (heap._M_TRIM_THRESHOLD, heap._TRIM_AFTER),
        ("trim", 0),
    ]
