"""Pretraining on WebDataset shards end to end: exact resume after SIGKILL, and two "machines"
under torchrun (``--nnodes 2``, gloo on localhost) reading disjoint samples."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import torch
from helpers import REPO, sigkill_when_marker_appears, tiny_run_opts

CONFIG = str(REPO / "configs" / "synthetic" / "bicaptioning_R_18.yaml")
ITERS, KILL_AFTER = 7, 3  # checkpoints after iterations 1, 3, 5, 6: killed between 3 and 5

# tools/train_net.py, logging every batch the trainer takes (iteration, rank, sample names), and
# optionally freezing after iteration KILL_AFTER (to be SIGKILLed).
CHILD = """
import json, sys, time
sys.path.insert(0, {tools!r})
import train_net
from detectron2.engine import HookBase
from detectron2.utils import comm
from virtex_d2.data.streaming import StreamingTrainLoader

plain_iter = StreamingTrainLoader.__iter__

def logged_iter(self):
    it = self.start_iter
    for batch in plain_iter(self):
        with open({log!r}, "a") as f:
            f.write(json.dumps([it, comm.get_rank(), [d["file_name"] for d in batch]]) + "\\n")
        it += 1
        yield batch

StreamingTrainLoader.__iter__ = logged_iter

class Freeze(HookBase):
    def after_step(self):
        if self.trainer.iter == {kill_after}:
            open({marker!r}, "w").close()
            time.sleep(600)

def main(args):
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if {kill_after} >= 0:
        trainer.register_hooks([Freeze()])
    trainer.train()

args = train_net.default_argument_parser().parse_args(sys.argv[1:])
train_net.launch(main, args.num_gpus, args=(args,))
"""


def child_script(tmp_path, log, kill_after=-1):
    path = tmp_path / f"child_{kill_after}.py"
    path.write_text(
        CHILD.format(
            tools=str(REPO / "tools"),
            log=str(log),
            kill_after=kill_after,
            marker=str(tmp_path / "frozen"),
        )
    )
    return str(path)


def opts(synthetic, shards, out, batch=4):
    # 48 px: random crops, flips and colour jitter stay on.
    run = tiny_run_opts(
        synthetic, out, iters=ITERS, batch=batch, crop=48, warmup=3, workers=2, seed=11
    )
    return [
        *run,
        "DATASETS.TRAIN",
        f"('webdataset:{shards['pattern']}',)",
        "DATASETS.TEST",
        "()",
        "DATALOADER.VIRTEX_SHUFFLE_BUFFER",
        "8",
    ]


def env():
    # One thread: CPU kernels then reduce in a fixed order in every process.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def read_log(log) -> dict:
    """{(iteration, rank): sample names}; an iteration logged twice (before the kill and after
    the resume) must have had the same batch both times."""
    batches = {}
    for line in log.read_text().splitlines():
        it, rank, names = json.loads(line)
        assert batches.setdefault((it, rank), names) == names, (it, rank)
    return batches


def run(cmd, **kw):
    proc = subprocess.run(
        cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600, **kw
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_sigkilled_run_on_shards_resumes_to_the_same_samples_and_weights(
    synthetic, shards, tmp_path
):
    full, broken = tmp_path / "full", tmp_path / "broken"
    full_log, broken_log = tmp_path / "full.jsonl", tmp_path / "broken.jsonl"
    run(
        [
            sys.executable,
            child_script(tmp_path, full_log),
            "--config-file",
            CONFIG,
            *opts(synthetic, shards, full),
        ]
    )

    marker = tmp_path / "frozen"
    returncode = sigkill_when_marker_appears(
        [
            sys.executable,
            child_script(tmp_path, broken_log, KILL_AFTER),
            "--config-file",
            CONFIG,
            *opts(synthetic, shards, broken),
        ],
        marker,
        cwd=REPO,
        env=env(),
    )
    assert returncode == -signal.SIGKILL
    assert (broken / "last_checkpoint").read_text() == "model_0000003.pth"
    log = run(
        [
            sys.executable,
            child_script(tmp_path, broken_log),
            "--config-file",
            CONFIG,
            "--resume",
            *opts(synthetic, shards, broken),
        ]
    )
    assert "Starting training from iteration 4" in log

    expected, got = read_log(full_log), read_log(broken_log)
    assert sorted(expected) == sorted(got) == [(i, 0) for i in range(ITERS)]
    assert expected == got  # same samples in the same order, before and after the kill
    a = torch.load(full / "model_final.pth", weights_only=True)
    b = torch.load(broken / "model_final.pth", weights_only=True)
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, differ
    # (epoch, shard ordinal, offset) of the 2 streams: 4 shards of 3 per stream and epoch; stream
    # 0 took 4 batches of 4 (so it resumed across its epoch boundary), stream 1 took 3.
    positions = b["trainer"]["hooks"]["TrainLoaderStateHook"]["ranks"][0]["positions"]
    assert positions == [[1, 1, 1], [0, 3, 3]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_read_disjoint_samples(synthetic, shards, tmp_path):
    log, out = tmp_path / "log.jsonl", tmp_path / "out"
    script = child_script(tmp_path, log)
    port = str(_free_port())
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                script,
                "--config-file",
                CONFIG,
                *opts(synthetic, shards, out, batch=2),
            ],
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=400)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, text in zip(nodes, outputs):
        assert node.returncode == 0, text[-3000:]
    batches = read_log(log)
    assert sorted(batches) == [(i, r) for i in range(ITERS) for r in (0, 1)]
    per_rank = [sum((batches[i, r] for i in range(ITERS)), []) for r in (0, 1)]
    assert all(len(names) == ITERS for names in per_rank)  # 2 images per step over 2 ranks
    # Each rank reads its own shards (in epoch 0: each of its 2 streams takes at most 4 of its
    # 6 samples): no sample, and no shard, is read by both.
    assert not set(per_rank[0]) & set(per_rank[1])
    shards_of = [{n.split("#")[0] for n in names} for names in per_rank]
    assert not shards_of[0] & shards_of[1]
    final = torch.load(out / "model_final.pth", weights_only=True)
    # Both ranks' stream positions reached rank 0's checkpoint: stream 0 took 4 samples (shard
    # ordinal 1, offset 1), stream 1 took 3 (ordinal 0, offset 3), 7 read per rank.
    ranks = final["trainer"]["hooks"]["TrainLoaderStateHook"]["ranks"]
    assert [r["positions"] for r in ranks] == [[[0, 1, 1], [0, 0, 3]]] * 2
    assert [r["read"] for r in ranks] == [ITERS, ITERS]


def test_train_net_names_a_missing_shard_before_training(synthetic, shards, tmp_path):
    bad = "('webdataset:/nonexistent/{00000..00003}.tar',)"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_net.py"),
            "--config-file",
            CONFIG,
            *opts(synthetic, shards, tmp_path),
            "DATASETS.TRAIN",
            bad,
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "/nonexistent/00000.tar: No such file or directory" in proc.stderr
    assert "Starting training" not in proc.stderr
