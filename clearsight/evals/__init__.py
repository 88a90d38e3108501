"""clearsight.evals: hallucination benchmarks (POPE, CHAIR, CrossCheck, MME, AMBER; more as plug-ins, see
``clearsight.evals.benchmarks``) and the built-in shapes world.

Stages (shared/evals.md): generate once into a :class:`GenerationCache`, score with pure functions, then
write a report. See docs/evals.md for examples.
"""

from clearsight.evals.cache import GenerationCache, cache_key
from clearsight.evals.datasets.pope import (
    SPLITS,
    PopeFile,
    PopeGenerationConfig,
    PopeQuestion,
    PopeSet,
    build_prompt,
    check_images,
    generate_pope_questions,
    load_llava_pope,
    load_pope_file,
    load_pope_parquet,
    write_pope_files,
)
from clearsight.evals.datasets.shapes import (
    Scene,
    ShapeObject,
    ShapesWorldFiles,
    ShapesWorldSpec,
    generate_scenes,
    load_builtin_shapes,
    partner_rate,
    render_scene,
    resolve_builtin,
    shapes_chair_vocabulary,
    write_shapes_world,
)
from clearsight.evals.errors import EvalInputError
from clearsight.evals.metrics.chair import (
    ChairResult,
    ChairVocabulary,
    build_ground_truth,
    compute_chair,
    drop_incomplete_sentence,
    load_captions_file,
    sample_image_ids,
)
from clearsight.evals.metrics.crosscheck import (
    CrossCheckResult,
    EmbeddingScorer,
    PromptJudgeScorer,
    SentenceScorer,
    correlate,
    crosscheck_explicit,
    pearson,
    rank_systems,
    spearman,
    split_sentences,
)
from clearsight.evals.metrics.pope import PopeMetrics, PopeReport, pope_metrics, score_pope
from clearsight.evals.parsers import PARSERS, parse_negation, parse_pope, parse_strict
from clearsight.evals.report import DataFile, EvalResults, SystemResult, write_report

__all__ = [
    "PARSERS", "SPLITS", "ChairResult", "ChairVocabulary", "CrossCheckResult", "DataFile", "EmbeddingScorer",
    "EvalInputError", "EvalResults", "GenerationCache", "PopeFile", "PopeGenerationConfig", "PopeMetrics",
    "PopeQuestion", "PopeReport", "PopeSet", "PromptJudgeScorer", "Scene", "SentenceScorer", "ShapeObject",
    "ShapesWorldFiles", "ShapesWorldSpec", "SystemResult", "build_ground_truth", "build_prompt", "cache_key",
    "check_images", "compute_chair", "correlate", "crosscheck_explicit", "drop_incomplete_sentence",
    "generate_pope_questions", "generate_scenes", "load_builtin_shapes", "load_captions_file",
    "load_llava_pope", "load_pope_file", "load_pope_parquet", "parse_negation", "parse_pope", "parse_strict",
    "partner_rate", "pearson", "pope_metrics", "rank_systems", "render_scene", "resolve_builtin",
    "sample_image_ids", "score_pope", "shapes_chair_vocabulary", "spearman", "split_sentences",
    "write_pope_files", "write_report", "write_shapes_world",
]
