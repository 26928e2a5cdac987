"""benchmarks/tarflow_reference.py: flowforge's TarFlow against the official apple/ml-tarflow code, same weights.

The side-by-side runs need the official ``transformer_flow.py``: set ``FLOWFORGE_TARFLOW_REFERENCE`` to the folder
holding it (``git clone https://github.com/apple/ml-tarflow``); without it they are skipped."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import tarflow_reference as bench  # noqa: E402  (benchmarks/tarflow_reference.py)

REFERENCE = os.environ.get("FLOWFORGE_TARFLOW_REFERENCE", "")


def reference_dir() -> str:
    if not REFERENCE or not os.path.isfile(os.path.join(REFERENCE, "transformer_flow.py")):
        pytest.skip("FLOWFORGE_TARFLOW_REFERENCE does not name a folder with apple/ml-tarflow's transformer_flow.py")
    return REFERENCE


def test_quick_run_agrees_with_the_reference(tmp_path, capsys):
    """--quick (1 x 8 x 8, patch 2, channels 64, 2 blocks): log p, plain samples (cached and uncached) and guided
    samples (classifier-free and attention-temperature, constant and annealed) agree with the reference: float64 to
    1e-12 (log p per sample; its magnitude is about 70) and 1e-12 (samples), float32 to 1e-4 and 1e-5."""
    out = tmp_path / "tarflow_reference.md"
    agree, times = bench.main(["--quick", "--reference-dir", reference_dir(), "--threads", "1", "--out", str(out)])
    assert set(agree) == {(d, k) for d in ("float32", "float64") for k in ("unconditional", "10 classes")}
    for (dtype, kind), a in agree.items():
        lp_tol, sample_tol = (1e-12, 1e-12) if dtype == "float64" else (1e-4, 1e-5)
        assert a["log_prob"] <= lp_tol, (dtype, kind, a)
        assert a["log_prob_scale"] > 10, (dtype, kind, a)
        for key in ("sample", "sample_uncached", "guided", "guided_annealed"):
            assert a[key] <= sample_tol, (dtype, kind, key, a)
        assert 1.0 < a["sample_scale"] < 100, (dtype, kind, a)
    assert set(times) == {
        "step: reference",
        "step: flowforge",
        "step: flowforge compiled",
        "sample: reference",
        "sample: flowforge cached",
        "sample: flowforge cached, compiled",
        "sample: flowforge uncached",
        "compile: first call s",
        "compile: first training step s",
        "compile: largest sample difference",
    }
    assert times.pop("compile: largest sample difference")[0] <= 1e-5  # float32, the eager cached sampler's draw
    assert all(ms > 0 for ms, _ in times.values())
    text = out.read_text()
    assert "within 1e-05" in text and "| step: flowforge |" in text and "Compiled sampler" in text
    assert text in capsys.readouterr().out


def test_the_comparison_sees_a_wrong_null_context_and_the_randomised_outputs():
    """The guided comparison is sensitive: with flowforge's null context 0 instead of ones(K) / K (the reference's
    mean class embedding) the classifier-free guided samples differ by more than 1e-3, while with ones(K) / K they
    agree to 1e-12 (float64).  The reference's output projections are randomised (non-zero) before the copy."""
    ref_module = bench.import_reference(reference_dir())
    args = bench.parse(["--quick", "--reference-dir", REFERENCE])
    cfg, dtype = args.config, torch.float64
    ref, model = bench.build_pair(ref_module, cfg, 10, dtype, "cpu", seed=0)
    assert all(b.proj_out.weight.abs().min() > 0 for b in ref.blocks)
    assert torch.equal(model.blocks[1].proj_out.weight, ref.blocks[1].proj_out.weight)
    labels = torch.arange(cfg.samples)

    def guided_difference() -> float:
        torch.manual_seed(5)
        z = torch.randn(cfg.samples, cfg.dim, dtype=dtype).view(cfg.samples, cfg.tokens, -1)
        with torch.no_grad(), bench.float64_casts():
            s_ref = ref.reverse(z, labels, guidance=2.0)
            torch.manual_seed(5)
            s_ff = model.sample(cfg.samples, labels, guidance=2.0) * 2 - 1
        return (s_ref - s_ff).abs().max().item()

    assert guided_difference() <= 1e-12
    with torch.no_grad():
        model.null_context.zero_()
    assert guided_difference() > 1e-3


def test_missing_reference_names_where_to_get_it(tmp_path):
    with pytest.raises(SystemExit, match="git clone https://github.com/apple/ml-tarflow"):
        bench.import_reference(str(tmp_path / "absent"))


def test_options():
    """--quick, --paper and explicit sizes; widths the reference's 64-wide heads cannot split are refused."""
    quick = bench.parse(["--quick"])
    assert (quick.config.channels, quick.config.tokens, quick.rounds, quick.steps) == (64, 16, 2, 1)
    paper = bench.parse(["--paper"])
    assert (paper.config.channels, paper.config.blocks, paper.config.layers, paper.config.tokens) == (768, 8, 8, 1024)
    assert bench.parse(["--channels", "192", "--batch", "8", "--samples", "4"]).config.channels == 192
    with pytest.raises(SystemExit):
        bench.parse(["--channels", "96"])
    with pytest.raises(SystemExit):
        bench.parse(["--batch", "4", "--samples", "8"])
