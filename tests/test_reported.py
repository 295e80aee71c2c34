"""The reported figures: every one names a known source, and the ViT-L/14 rows of the
second method catalogue (issue 18) are there, rendered in their own cited table."""

from __future__ import annotations

from atmbench import reported


def test_every_figure_cites_known_sources():
    for figure in reported.FIGURES:
        assert all(key in reported.SOURCES for key in figure.source.split("; ")), figure


def test_vision8_vit_l14_figures_of_the_new_methods():
    found = {(f.method, f.figure, f.source) for f in reported.figures("vision8", "ViT-L-14")}
    assert {
        ("wudi", "92.6", "WUDI paper"),
        ("cart", "92.6", "CART paper"),
        ("pcb", "87.5", "WUDI paper"),
        ("emr", "93.73", "EMR logs"),
        ("adamerging", "80.1", "FusionBench CLIP docs"),
        ("adamerging_layer", "91.0", "FusionBench CLIP docs"),
        ("regmean_pp", "91.0", "FusionBench CLIP docs"),
        ("ta", "80.7", "FusionBench CLIP docs"),
    } <= found
    text = reported.render_markdown("vision8", "ViT-L-14")
    assert text.startswith("## vision8 / ViT-L-14: reported, not measured")
    assert "docs/modelpool/clip_vit.md" in text and "arXiv:2503.08099" in text
