"""Sharing backbones (README "Sharing backbones"): hubconf.py entry points and
``tools/convert_to_d2.py --to torchvision`` give torchvision ResNets computing the same features
as the Detectron2 / VirTex backbone they come from."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from helpers import REPO, load_tool
from test_convert import FakeVirTex, randomise_norms_

from virtex_d2.checkpoint.convert import convert_checkpoint, save_d2_checkpoint
from virtex_d2.checkpoint.to_torchvision import d2_to_torchvision_state

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def hub(name: str, weights=None) -> torch.nn.Module:
    return torch.hub.load(str(REPO), name, source="local", weights=weights, trust_repo=True)


def convert_tool():
    return load_tool("convert_to_d2")


@pytest.fixture(scope="module")
def virtex_r50(tmp_path_factory):
    """A VirTex pretraining checkpoint layout (Detectron2 ResNet-50 under ``backbone.`` next to
    a textual head) with random BN statistics, and its res5 features pooled: (2, 2048)."""
    net = randomise_norms_(FakeVirTex(50), seed=4)
    path = tmp_path_factory.mktemp("virtex") / "model_final.pth"
    torch.save({"model": net.state_dict(), "iteration": 99}, path)
    with torch.no_grad():
        pooled = net.backbone(X)["res5"].mean(dim=(2, 3))
    return {"path": str(path), "pooled": pooled}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_to_d2_to_torchvision_is_the_identity(arch):
    net = randomise_norms_(getattr(torchvision.models, arch)(), seed=5)
    back = d2_to_torchvision_state(convert_checkpoint(net.state_dict(), "torchvision").d2_state)
    original = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert back.keys() == original.keys()
    for k, v in original.items():
        if not k.endswith("num_batches_tracked"):  # training bookkeeping, returned as 0
            assert torch.equal(back[k], v), k
    copy = getattr(torchvision.models, arch)()
    copy.load_state_dict(back, strict=False)
    copy.fc, net.fc = torch.nn.Identity(), torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(copy.eval()(X), net(X))


def test_hub_resnet50_from_a_virtex_checkpoint_equals_the_d2_res5_pooled_features(virtex_r50):
    model = hub("resnet50", virtex_r50["path"])
    assert isinstance(model, torchvision.models.ResNet) and not model.training
    with torch.no_grad():
        out = model(X)
    assert out.shape == (2, 2048)
    torch.testing.assert_close(out, virtex_r50["pooled"], rtol=1e-4, atol=1e-4)


def test_convert_tool_writes_torchvision_weights_missing_only_fc(virtex_r50, tmp_path, capsys):
    out = tmp_path / "r50_tv.pth"
    assert convert_tool().main(["--to", "torchvision", virtex_r50["path"], str(out)]) == 0
    assert "torchvision.models.resnet50()" in capsys.readouterr().out
    state = torch.load(out, weights_only=True)
    model = torchvision.models.resnet50()
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X), virtex_r50["pooled"], rtol=1e-4, atol=1e-4)


def test_hub_reads_a_converted_d2_backbone_and_refuses_another_architecture(tmp_path):
    net = randomise_norms_(FakeVirTex(18), seed=6)
    path = tmp_path / "r18_d2.pth"
    save_d2_checkpoint(convert_checkpoint({"model": net.state_dict()}, "virtex_d2"), str(path))
    model = hub("resnet18", str(path))
    with torch.no_grad():
        out = model(X)
        ref = net.backbone(X)["res5"].mean(dim=(2, 3))
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="holds a resnet18, not a resnet50"):
        hub("resnet50", str(path))


def test_wide_and_deep_entry_points(tmp_path):
    wide = randomise_norms_(torchvision.models.wide_resnet50_2(), seed=7)
    path = tmp_path / "wide.pth"
    torch.save(wide.state_dict(), path)
    model = hub("wide_resnet50_2", str(path))
    wide.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(model(X[:1]), wide(X[:1]))
        assert hub("resnet101")(X[:1]).shape == (1, 2048)


def test_hub_loading_does_not_need_detectron2(virtex_r50):
    code = (
        "import sys, torch\n"
        f"m = torch.hub.load({str(REPO)!r}, 'resnet50', source='local', "
        f"weights={virtex_r50['path']!r}, trust_repo=True)\n"
        "print(tuple(m(torch.zeros(1, 3, 64, 64)).shape), 'detectron2' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == "(1, 2048) False"
