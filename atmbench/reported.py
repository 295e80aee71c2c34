"""Figures reported in papers: data with citations, rendered only as "reported, not measured".

They are kept apart from the store on purpose: a reported figure comes from other experts,
other heads and another protocol, so it never enters a measured table, only a separate one
that names its source. Figures are average absolute test accuracy (%) over the suite's tasks;
for the GLUE suites, the average of the source's per-task scores (FusionBench scores CoLA
by accuracy where atmbench uses Matthews correlation, and STS-B by Spearman's ρ × 100).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tabulate import tabulate

SOURCES = {
    "FusionBench": "A. Tang et al., FusionBench: A Comprehensive Benchmark of Deep Model Fusion, "
    "2024, arXiv:2406.03280",
    "task_vectors": "G. Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, "
    "arXiv:2212.04089",
    "TSV paper": "A. A. Gargiulo et al., Task Singular Vectors: Reducing Task Interference in "
    "Model Merging, CVPR 2025, arXiv:2412.00081",
    "Iso paper": "D. Marczak et al., No Task Left Behind: Isotropic Model Merging with Common "
    "and Task-Specific Subspaces, ICML 2025, arXiv:2502.04959",
    "ATM paper": "L. Zhou et al., ATM: Improving Model Merging by Alternating Tuning and "
    "Merging, 2024, arXiv:2411.03055",
    "CART paper": "J. Choi et al., Revisiting Weight Averaging for Model Merging, 2024, "
    "arXiv:2412.12153 (table in the official repository JH-GEECS/CART)",
    "WUDI paper": "R. Cheng et al., Whoever Started the Interference Should End It: Guiding "
    "Data-Free Model Merging via Task Vectors, ICML 2025, arXiv:2503.08099 (table in the "
    "official repository nathanielyvo/WUDI-Merging)",
    "EMR logs": "C. Huang et al., EMR-Merging: Tuning-Free High-Performance Model Merging, "
    "NeurIPS 2024, arXiv:2405.17461 (the official repository harveyhuang18/EMR_Merging, "
    "merge_vit/logs/ViT-B-32 and ViT-L-14 emr_merging logs)",
    "AdaMerging logs": "E. Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task "
    "Learning, ICLR 2024, arXiv:2310.02575 (training logs in the official repository "
    "EnnengYang/AdaMerging, logs/ViT-B-32)",
    "FusionBench CLIP docs": "FusionBench documentation, docs/modelpool/clip_vit.md "
    "(tanganke/fusion_bench @54c9e8c), tables of multi-task model merging with its CLIP-ViT-B/32 "
    "and ViT-L/14 experts (FusionBench's own runs)",
    "FusionBench MagMax docs": "FusionBench documentation, docs/algorithms/magmax.md "
    "(tanganke/fusion_bench), FusionBench's own runs of MagMax",
    "FusionBench Flan-T5 docs": "FusionBench documentation, docs/modelpool/flan-t5_generation.md "
    "(tanganke/fusion_bench), tables of multi-task merging with its Flan-T5 GLUE experts",
    "FusionBench GPT-2 docs": "FusionBench documentation, docs/modelpool/gpt2_classification.md "
    "(tanganke/fusion_bench), table of multi-task merging with its GPT-2 GLUE experts",
}


@dataclass(frozen=True)
class ReportedFigure:
    suite: str
    model: str
    method: str
    """The atmbench row it corresponds to (method spec or reference name)."""
    paper_name: str
    figure: str
    """As printed: a number, or a range where sources disagree."""
    setting: str
    source: str
    """A key of :data:`SOURCES`, or several joined by ``"; "``."""


def _vision8_b32(
    method: str, name: str, figure: str, source: str, setting: str = ""
) -> ReportedFigure:
    return ReportedFigure("vision8", "ViT-B-32", method, name, figure, setting, source)


def _glue(suite: str, model: str, source: str, setting: str, rows) -> list[ReportedFigure]:
    """Rows of (atmbench row, paper's name, figure, λ or ""): one source and setting."""
    return [
        ReportedFigure(
            suite, model, method, name, figure, f"{setting}; {extra}".strip("; "), source
        )
        for method, name, figure, extra in rows
    ]


_T5 = "FusionBench Flan-T5 docs"
_CoLA = "CoLA by accuracy"
GLUE_FIGURES = (
    # FusionBench's tables "Multi-task model merging methods using Flan-T5-Base (full
    # fine-tuned) / (LoRA r=16) / Flan-T5-Large (LoRA r=16) models" and the GPT-2 table.
    *_glue(
        "glue8",
        "flan-t5-base",
        _T5,
        f"full fine-tuned experts; {_CoLA}",
        [
            ("pretrained", "Pre-trained", "75.7", ""),
            ("experts", "Fine-tuned (STL)", "86.4", ""),
            ("average", "Simple Average", "78.9", ""),
            ("ta", "Task Arithmetic", "78.9", "λ = 0.3"),
            ("ties", "Ties-Merging", "79.9", "λ = 0.3"),
        ],
    ),
    *_glue(
        "glue8",
        "flan-t5-base",
        _T5,
        f"LoRA r=16 experts; {_CoLA}",
        [
            ("experts", "Fine-tuned (STL)", "84.6", ""),
            ("average", "Simple Average", "78.2", ""),
            ("ta", "Task Arithmetic", "77.4", "λ = 0.3"),
            ("ties", "Ties-Merging", "77.5", "λ = 0.3"),
        ],
    ),
    *_glue(
        "glue8",
        "flan-t5-large",
        _T5,
        f"LoRA r=16 experts; {_CoLA}",
        [
            ("pretrained", "Pre-trained", "82.1", ""),
            ("experts", "Fine-tuned (STL)", "89.6", ""),
            ("average", "Simple Average", "86.5", ""),
            ("ta", "Task Arithmetic", "87.3", "λ = 0.3"),
            ("ties", "Ties-Merging", "87.4", "λ = 0.3"),
        ],
    ),
    *_glue(
        "glue7",
        "gpt2",
        "FusionBench GPT-2 docs",
        _CoLA,
        [
            ("experts", "Fine-tuned (STL)", "82.0", ""),
            ("average", "Simple Average", "56.1", ""),
            ("fisher", "Fisher Merging", "58.7", ""),
            ("regmean", "RegMean", "68.8", ""),
            ("ta", "Task Arithmetic", "70.0", "λ = 0.5"),
            ("ties", "Ties-Merging", "70.0", "λ = 0.6"),
        ],
    ),
)


def _vision8_l14(
    method: str, name: str, figure: str, source: str, setting: str = ""
) -> ReportedFigure:
    return ReportedFigure("vision8", "ViT-L-14", method, name, figure, setting, source)


_FB_CLIP = "FusionBench CLIP docs"
_WUDI_ROW = "a baseline in the WUDI table"
VISION8_L14 = (
    _vision8_l14("pretrained", "Pre-trained", "64.6", _FB_CLIP),
    _vision8_l14("experts", "Fine-tuned (STL)", "94.3", _FB_CLIP),
    _vision8_l14("mtl", "Traditional MTL", "92.4", _FB_CLIP),
    _vision8_l14("average", "Simple Averaging", "80.0", _FB_CLIP),
    _vision8_l14("fisher", "Fisher Merging", "80.3", _FB_CLIP),
    _vision8_l14("regmean", "RegMean", "90.4", _FB_CLIP),
    _vision8_l14("regmean_pp", "RegMean++", "91.0", _FB_CLIP),
    _vision8_l14("ta", "Task Arithmetic", "80.7", _FB_CLIP, "λ = 0.3 fixed"),
    _vision8_l14("ties", "Ties-Merging", "84.0", _FB_CLIP, "λ = 0.3 fixed"),
    _vision8_l14("adamerging", "Task-wise AdaMerging", "80.1", _FB_CLIP, "labelled λ = 0.3"),
    _vision8_l14("adamerging_layer", "Layer-wise AdaMerging", "91.0", _FB_CLIP, "labelled λ = 0.3"),
    _vision8_l14("ta", "Task Arithmetic", "84.5", "WUDI paper", _WUDI_ROW),
    _vision8_l14("ties", "Ties-Merging", "86.0", "WUDI paper", _WUDI_ROW),
    _vision8_l14("pcb", "PCB Merging", "87.5", "WUDI paper", _WUDI_ROW),
    _vision8_l14("wudi", "WUDI-Merging", "92.6", "WUDI paper"),
    _vision8_l14("cart", "CART", "92.6", "CART paper"),
    _vision8_l14("emr", "EMR-Merging", "93.73", "EMR logs", "one model per task"),
)


FIGURES: tuple[ReportedFigure, ...] = (
    _vision8_b32("pretrained", "zero-shot", "48.2", "FusionBench"),
    _vision8_b32("experts", "individual experts", "90.3–90.5", "FusionBench; task_vectors"),
    _vision8_b32("mtl", "multi-task learning", "88.6", "FusionBench"),
    _vision8_b32("average", "weight averaging", "66.5", "FusionBench"),
    _vision8_b32("ta", "Task Arithmetic", "68.0", "FusionBench", "λ = 0.3 fixed"),
    _vision8_b32("ta", "Task Arithmetic", "70.8", "TSV paper"),
    _vision8_b32("ties", "TIES-Merging", "72.2", "FusionBench", "λ = 0.3 fixed"),
    _vision8_b32("ties", "TIES-Merging", "75.1", "Iso paper"),
    _vision8_b32("fisher", "Fisher merging", "70.6", "FusionBench"),
    _vision8_b32("regmean", "RegMean", "82.4", "FusionBench"),
    _vision8_b32("consensus_ta", "Consensus TA", "75.0", "TSV paper"),
    _vision8_b32("tsv", "TSV-M", "85.9", "TSV paper"),
    _vision8_b32("tsv", "TSV-M", "83.1", "FusionBench", "FusionBench's experts"),
    _vision8_b32("iso_c", "Iso-C", "86.3", "Iso paper"),
    _vision8_b32("iso_cts", "Iso-CTS", "86.2", "Iso paper"),
    _vision8_b32("cart", "CART", "84.7", "CART paper", "λ 2.0, rank 0.12"),
    _vision8_b32("wudi", "WUDI-Merging", "85.2", "WUDI paper"),
    _vision8_b32(
        "magmax", "MagMax", "70.70", "FusionBench MagMax docs", "α = 0.5, independent experts"
    ),
    _vision8_b32("magmax", "MagMax", "71.10", "FusionBench MagMax docs", "best α = 0.6"),
    _vision8_b32(
        "adamerging", "Task-wise AdaMerging", "71.09", "AdaMerging logs", "after 500 steps"
    ),
    _vision8_b32(
        "adamerging_layer", "Layer-wise AdaMerging", "80.18", "AdaMerging logs", "after 500 steps"
    ),
    _vision8_b32("pcb", "PCB Merging", "76.3", "WUDI paper", "a baseline in the WUDI table"),
    _vision8_b32("emr", "EMR-Merging", "88.74", "EMR logs", "one model per task"),
    _vision8_b32("ta", "Task Arithmetic", "69.1", "WUDI paper", "a baseline in the WUDI table"),
    _vision8_b32("ties", "Ties-Merging", "72.4", "WUDI paper", "a baseline in the WUDI table"),
    _vision8_b32("wudi", "WUDI-Merging", "84.5", "FusionBench CLIP docs"),
    _vision8_b32("regmean_pp", "RegMean++", "84.4", "FusionBench CLIP docs"),
    _vision8_b32(
        "adamerging", "Task-wise AdaMerging", "68.7", "FusionBench CLIP docs", "labelled λ = 0.3"
    ),
    _vision8_b32(
        "adamerging_layer",
        "Layer-wise AdaMerging",
        "82.6",
        "FusionBench CLIP docs",
        "labelled λ = 0.3",
    ),
    *VISION8_L14,
    ReportedFigure(
        "vision14", "ViT-B-32", "cart", "CART", "79.5", "λ 1.5, rank 0.16", "CART paper"
    ),
    ReportedFigure("vision14", "ViT-L-14", "cart", "CART", "88.7", "", "CART paper"),
    ReportedFigure(
        "vision20", "ViT-B-32", "cart", "CART", "76.3", "λ 1.9, rank 0.32", "CART paper"
    ),
    ReportedFigure("vision20", "ViT-L-14", "cart", "CART", "87.9", "", "CART paper"),
    ReportedFigure("vision14", "ViT-B-32", "tsv", "TSV-M", "80.1", "", "TSV paper"),
    ReportedFigure("vision20", "ViT-B-32", "tsv", "TSV-M", "77.1", "", "TSV paper"),
    ReportedFigure(
        "vision8", "ViT-B-16", "atm", "ATM", "77.65", "budget 2 epochs per task", "ATM paper"
    ),
    ReportedFigure(
        "vision8", "ViT-B-16", "atm", "ATM", "83.26", "budget 4 epochs per task", "ATM paper"
    ),
    ReportedFigure(
        "vision8", "ViT-B-16", "atm", "ATM", "88.08", "budget 10 epochs per task", "ATM paper"
    ),
    ReportedFigure(
        "vision8",
        "ViT-B-16",
        "ta",
        "Task Arithmetic",
        "72.70",
        "start of the refinement below",
        "ATM paper",
    ),
    ReportedFigure(
        "vision8",
        "ViT-B-16",
        "ta+atm",
        "ATM refinement of TA",
        "79.67",
        "post-hoc, validation data",
        "ATM paper",
    ),
)


FIGURES += GLUE_FIGURES


def figures(suite: str, model: str) -> list[ReportedFigure]:
    return [f for f in FIGURES if f.suite == suite and f.model == model]


def pairs() -> list[tuple[str, str]]:
    """Every (suite, model) with reported figures, in first-mention order."""
    return list(dict.fromkeys((f.suite, f.model) for f in FIGURES))


def as_dicts(suite: str, model: str) -> list[dict[str, str]]:
    """The figures with their full citations, for JSON output."""
    return [dict(asdict(f), citation=_citation(f.source)) for f in figures(suite, model)]


def _citation(source: str) -> str:
    return "; ".join(SOURCES[key] for key in source.split("; "))


def render_markdown(suite: str, model: str) -> str:
    """A separate table titled "reported, not measured", with its sources cited below it."""
    found = figures(suite, model)
    rows = [[f.method, f.paper_name, f.figure, f.setting, f.source] for f in found]
    keys = list(dict.fromkeys(k for f in found for k in f.source.split("; ")))
    measure = "score" if suite.startswith("glue") else "accuracy"  # GLUE mixes metrics
    table = tabulate(
        rows,
        headers=["atmbench row", "paper's name", f"avg {measure}", "setting", "source"],
        tablefmt="pipe",
        disable_numparse=True,
        colalign=("left", "left", "right", "left", "left"),
    )
    return "\n\n".join(
        [
            f"## {suite} / {model}: reported, not measured  (average test {measure}, %)",
            "Copied from papers, not produced by atmbench. Papers use different experts and "
            "protocols: compare methods within one source, never across sources or with a "
            "measured table.",
            table,
            "Sources:\n\n" + "\n".join(f"- {k}: {SOURCES[k]}" for k in keys),
        ]
    )
