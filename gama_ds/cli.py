"""The `gama-ds` command: one subcommand per user flow, each a thin shell over the library."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from . import __version__
from .errors import GamaDsError, UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """'256MB' -> 256e6, '1GiB' -> 2**30, '4096' -> 4096."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256MB, 1GiB or a byte count)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    base = unit[:1] if unit[:1] in "kmgt" else ""
    scale = 1024 ** "_kmgt".index(base) if unit.endswith("ib") and base else _UNITS[base]
    return int(number * scale)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_convert(sub) -> None:
    from .audio import BACKENDS
    from .data.convert import ORDERS, ConvertOptions

    d = ConvertOptions()
    p = sub.add_parser("convert", help="JSON/JSONL QA records -> tar shards of fbank features")
    p.add_argument(
        "inputs", nargs="+", help="GAMA/LTU JSON, {audio,question,answer} JSON(L), or eval JSON files"
    )
    p.add_argument("--out", required=True, help="output directory for shards, index.json and rejects.jsonl")
    p.add_argument("--audio-root", help="base for relative audio paths (default: each JSON file's folder)")
    p.add_argument(
        "--shard-size",
        type=parse_size,
        default=d.shard_bytes,
        help="roll over to a new shard before this size (default 256MiB)",
    )
    p.add_argument("--shard-samples", type=_positive_int, help="at most this many clips per shard")
    p.add_argument("--workers", type=_positive_int, help="feature processes (default: all cores)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the clip order (default 0)")
    p.add_argument(
        "--order",
        choices=ORDERS,
        default=d.order,
        help="shuffle: sorted then seeded shuffle (default); input: first-seen order",
    )
    p.add_argument(
        "--backend",
        choices=("auto", *BACKENDS),
        default=d.backend,
        help="fbank implementation (auto: torchaudio when it imports)",
    )
    p.add_argument(
        "--max-reject-fraction",
        type=float,
        default=d.max_reject_fraction,
        help="exit 1 when more than this fraction of QA pairs is rejected (default 0)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete a previous conversion in --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_tagging(p, required=False)  # --tagger DIR: tag the clips too, as `gama-ds tag` does


def _add_tagging(p, required: bool) -> None:
    """The tagger flags of `gama-ds convert` and `gama-ds tag`; the numbers are checked by
    TagOptions.check, before the tagger loads."""
    from .tags.checks import ACTIVATIONS, DEFAULT_BATCH, DEFAULT_THRESHOLD, DEFAULT_TOP_K

    p.add_argument(
        "--tagger",
        required=required,
        help="an audio-classification model folder with an AST feature extractor (tags each clip)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help=f"at most this many tags per clip (default {DEFAULT_TOP_K})",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        help=f"keep tags scoring at least this (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--batch-size" if required else "--tag-batch-size",
        dest="tag_batch_size",
        type=int,
        default=DEFAULT_BATCH,
        help=f"clips per tagger batch (default {DEFAULT_BATCH})",
    )
    p.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="auto",
        help="scores from logits (auto: the config's problem_type; sigmoid when it has none)",
    )
    p.add_argument(
        "--device", help="where the tagger runs: cpu, cuda or cuda:N (default: the GPU when there is one)"
    )
    p.add_argument(
        "--dtype", help="the tagger's bf16, fp16 or fp32 (default: bf16 on GPUs that have it, else fp32)"
    )


def _tag_options(args):
    from .tags.options import TagOptions

    if args.tagger is None:
        return None
    return TagOptions(
        tagger=args.tagger,
        top_k=args.top_k,
        threshold=args.threshold,
        batch_size=args.tag_batch_size,
        activation=args.activation,
        device=args.device,
        dtype=args.dtype,
    )


def _convert(args) -> int:
    from .data.convert import ConvertOptions, convert, summary

    options = ConvertOptions(
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_size,
        seed=args.seed,
        order=args.order,
        backend=args.backend,
        audio_root=args.audio_root,
        max_reject_fraction=args.max_reject_fraction,
    )
    result = convert(
        args.inputs,
        args.out,
        options,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        tagging=_tag_options(args),
    )
    print(summary(result), file=sys.stderr)
    return 1 if result.failed else 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="recheck a shard directory against its index.json")
    p.add_argument("dir")
    p.add_argument("--workers", type=_positive_int, help="shards checked in parallel (default: all cores)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _verify(args) -> int:
    from .data.pool import default_workers
    from .data.shards import verify

    problems, seen = verify(args.dir, workers=args.workers or default_workers(), progress=not args.json)
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, **seen}, indent=1))
    elif problems:
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
    else:
        print(f"{args.dir}: OK, {seen['shards']} shard(s), {seen['samples']} samples", file=sys.stderr)
    return 1 if problems else 0


def _add_tag(sub) -> None:
    p = sub.add_parser("tag", help="add (or replace) audio event tags in a converted shard set")
    p.add_argument("dir", help="a gama-ds convert output directory")
    p.add_argument("--workers", type=_positive_int, help="CPU threads of the tagger (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_tagging(p, required=True)


def _tag(args) -> int:
    from .data.pool import default_workers
    from .tags.tag_set import tag_set

    tag_set(args.dir, _tag_options(args), args.workers or default_workers(), progress=not args.no_progress)
    return 0


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="print a shard set's totals and its first samples")
    p.add_argument("dir")
    p.add_argument("-n", type=int, default=3, help="samples to print (default 3)")


def _show(args) -> int:
    from .data.shards import iter_samples, read_index

    index = read_index(args.dir)
    t = index["totals"]
    print(
        f"{args.dir}: {t['samples']} clips, {t['qa_pairs']} QA pairs, {t['shards']} shard(s), "
        f"{t['bytes'] / 2**20:.1f} MiB, features by {index['features']['backend']}"
    )
    shown = 0
    for entry in index["shards"]:
        for sample in iter_samples(os.path.join(args.dir, entry["file"])):
            if shown >= args.n:
                return 0
            m = sample.meta
            print(
                f"- {entry['file']} {sample.key}: {m['audio']} {m['duration']:.2f}s "
                f"{m['sample_rate']}Hz -> fbank {list(sample.fbank.shape)} {sample.fbank.dtype}"
            )
            for qa in m["qa"]:
                print(f"    Q: {qa['instruction']}  A: {qa['output']}")
            if "tags" in m:
                shown_tags = ", ".join(f"{label} {score:.2f}" for label, score in m["tags"])
                print(f"    tags: {shown_tags or '(none passed the tagging)'}")
            shown += 1
    return 0


def _add_estimate(sub) -> None:
    p = sub.add_parser("estimate", help="parameter counts and per-GPU memory for a recipe, without weights")
    p.add_argument("recipe", help="a recipe file or a bundled name (stage1 ... stage5, tiny)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.micro_batch_size=2")
    p.add_argument("--world-size", type=_positive_int, default=8, help="GPUs in the job (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _estimate(args) -> int:
    from .config import load_recipe
    from .model.estimate import build_on_meta
    from .train.memory import estimate

    recipe = load_recipe(args.recipe, args.overrides)
    model = build_on_meta(recipe.model)
    est = estimate(
        model,
        args.world_size,
        recipe.train.micro_batch_size,
        recipe.data.cutoff_len,
        recipe.model.gradient_checkpointing,
    )
    if args.json:
        print(json.dumps({k: est[k] for k in ("params", "total", "trainable", "memory_gib")}))
        return 0
    print(f"{args.recipe}: {est['total']:,} parameters, {est['trainable']:,} trainable")
    for group, c in est["params"].items():
        print(f"  {group:<14} {c['total']:>15,} total {c['trainable']:>13,} trainable")
    print(
        f"per GPU with {args.world_size} GPUs, micro-batch {est['micro_batch']}, sequence {est['sequence']} "
        f"(activations {est['activations_gib']} GiB):"
    )
    for stage, gib in est["memory_gib"].items():
        print(f"  {stage}: {gib} GiB")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a recipe with DeepSpeed (under deepspeed/torchrun or alone)")
    p.add_argument("recipe", help="a recipe file or a bundled name (stage1 ... stage5, tiny)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, e.g. train.micro_batch_size=2")
    p.add_argument("--resume", help="'auto' (the latest complete checkpoint) or a checkpoint tag")
    p.add_argument(
        "--stop-at",
        type=int,
        default=0,
        metavar="STEP",
        help="save and stop after this optimizer step, as a preemption would (then --resume auto)",
    )


def _train(args) -> int:
    from .signals import listen_for_stop

    listen_for_stop()  # before the heavy imports: a stop signal while they load is kept, not fatal
    from .train.loop import train

    # The launch scripts resume every node through the environment (train.sh forwards GAMA_DS_*).
    resume = args.resume or os.environ.get("GAMA_DS_RESUME") or None
    result = train(args.recipe, args.overrides, resume, args.stop_at)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a run's checkpoint -> PEFT adapter, audio safetensors, config")
    p.add_argument("run", help="a run directory (its latest complete checkpoint) or one checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--merge", action="store_true", help="also write the LLM with LoRA merged (merged/)")
    p.add_argument(
        "--include-llm",
        action="store_true",
        help="copy the base LLM into the export (llm/) whatever its size (default: presets and LLMs "
        "up to 1 GiB; a larger one is named by absolute path and fingerprint)",
    )


def _export(args) -> int:
    from .train.export import export

    info = export(args.run, args.out, args.merge, args.include_llm)
    print(json.dumps({"out": args.out, **info["source"], "base_llm": info["base_llm"]["folder"]}))
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="answer questions about audio with an exported model")
    p.add_argument("--model", required=True, help="a gama-ds export folder")
    p.add_argument("--audio", help="one audio file (with --question)")
    p.add_argument("--question", help="the question about --audio")
    p.add_argument("--input", help="a GAMA/LTU JSON, audio-QA JSON(L) or eval file of questions")
    p.add_argument("--out", help="write answers as JSON lines here (default: stdout)")
    p.add_argument(
        "--greedy",
        action="store_true",
        help="greedy decoding (default: the export's sampling settings, else the reference's)",
    )
    p.add_argument("--beams", type=_positive_int, help="beam search with this many beams")
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        help="default: the export's setting, else 400 (the reference's)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument(
        "--tagger", help="with a soft prompt: the export's tagger from this folder (a moved or copied one)"
    )
    _add_placement(p)


def _generate(args) -> int:
    from .data.formats import read_inputs
    from .exported import INFO, export_tagger, soft_prompt_settings
    from .infer import export_generation, generate, tag_clips

    if bool(args.audio) == bool(args.input) or bool(args.audio) != bool(args.question):
        raise UsageError("give either --audio FILE --question TEXT, or --input JSON")
    placement = _placement(args)
    recorded = _export_info(args.model)
    soft = soft_prompt_settings(recorded)
    # With a soft prompt its prompts hold each clip's tags, which the training clips' tagger makes:
    # found first, so a moved or wrong one is named before the model loads (minutes for a 7B one).
    tagger = export_tagger(args.model, recorded, args.tagger, placement[0])
    model, tokenizer, info = _load_export(args, placement)
    defaults = export_generation(info, os.path.join(args.model, INFO))
    max_new_tokens = defaults.pop("max_new_tokens")
    max_new_tokens = args.max_new_tokens or max_new_tokens
    if args.audio:
        rows = [({"audio": args.audio}, args.audio, {"instruction": args.question, "input": ""})]
    else:
        records, rejects = read_inputs([args.input])
        for r in rejects:
            print(f"skipped {r.source}: {r.detail}", file=sys.stderr)
        rows = [({"audio": r.audio, "source": qa["source"]}, r.path, qa) for r in records for qa in r.qa]
    kwargs = defaults
    if args.beams:
        kwargs = dict(num_beams=args.beams, do_sample=False)
    elif args.greedy:
        kwargs = dict(do_sample=False)
    clips, tags = [path for _, path, _ in rows], [None] * len(rows)
    if tagger is not None:
        clips, tags = tag_clips(tagger, clips, soft)
    answers = generate(
        model,
        tokenizer,
        clips,
        [qa for *_, qa in rows],
        info["prompt"]["template"],
        args.batch_size,
        max_new_tokens,
        soft,
        tags,
        **kwargs,
    )
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    for (record, _, qa), answer, clip_tags in zip(rows, answers, tags, strict=True):
        row = {**record, **{k: v for k, v in qa.items() if k != "source"}, "answer": answer}
        if tagger is not None:
            row["tags"] = clip_tags  # the tags its prompt was given
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
    if args.out:
        out.close()
    return 0


def _add_placement(p) -> None:
    from .placement import DTYPES

    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU when there is one)")
    p.add_argument(
        "--dtype", choices=DTYPES, help="bf16, fp16 or fp32 (default: bf16 on GPUs that have it, else fp32)"
    )
    p.add_argument("--llm", help="the export's base LLM from this folder (a moved or copied one)")


def _placement(args):
    """--device and --dtype, checked before anything loads."""
    from .placement import choose_device, choose_dtype

    device = choose_device(args.device)
    return device, choose_dtype(args.dtype, device)


def _export_info(path: str) -> dict:
    """The export's gama_ds.json; a folder that is not an export is named."""
    from .exported import is_export, read_info

    if not is_export(path):
        raise UsageError(f"--model {path} is not a gama-ds export (made by `gama-ds export RUN --out DIR`)")
    return read_info(path)


def _load_export(args, placement):
    from .exported import load_export

    _export_info(args.model)
    return load_export(args.model, *placement, llm=args.llm)


def _add_import(sub) -> None:
    # The choices from the recipe's fields: the importer imports peft, and through it transformers'
    # audio code, which no other subcommand should need in order to start.
    from .config import ModelConfig, choices

    variants, aggregators = choices(ModelConfig, "variant"), choices(ModelConfig, "aggregator")

    p = sub.add_parser(
        "import",
        help="the released GAMA / GAMA-IT / LTU checkpoints -> an export that generate, eval and serve run",
    )
    p.add_argument(
        "--base", required=True, help="the base folder: Llama-2-7b-chat-hf-qformer (GAMA), vicuna_ltu (LTU)"
    )
    p.add_argument(
        "--checkpoint",
        help="a stage checkpoint: checkpoint-N/ or its pytorch_model.bin (audio modules, LoRA)",
    )
    p.add_argument("--variant", choices=variants, default="gama")
    p.add_argument(
        "--aggregator",
        choices=aggregators,
        help="GAMA's aggregator: released (default; what the checkpoints were trained with) or paper",
    )
    p.add_argument("--out", required=True, help="the export folder to write (new or empty)")
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides for a model of other sizes")


def _import(args) -> int:
    from .importer import import_released

    summary = import_released(
        args.base,
        args.checkpoint,
        args.out,
        args.variant,
        args.aggregator,
        args.overrides,
        log=lambda line: print(line, file=sys.stderr),
    )
    keys = ("base", "checkpoint", "variant", "aggregator", "lora", "loaded", "unknown")
    print(json.dumps({"out": args.out, **{k: summary[k] for k in keys}}))
    return 0


def _add_eval(sub) -> None:
    from .infer import METRICS

    p = sub.add_parser(
        "eval",
        help="an export on held-out shards (loss, exact match, accuracy) or on an evaluation suite "
        "(the paper's protocol, data-parallel over ranks)",
    )
    p.add_argument("--model", required=True, help="a gama-ds export folder")
    p.add_argument("--shards", nargs="+", help="shard directories written by gama-ds convert")
    p.add_argument(
        "--suite",
        help="an evaluation suite (YAML: eval files, labels, rules; docs/EVAL.md): fixed prompts, LTU-format "
        "rows per set, scores in a Table-1 shaped report; launch with torchrun to use every GPU",
    )
    p.add_argument("--out", help="with --suite: the folder for the result rows, part files and report.json")
    p.add_argument(
        "--metric",
        nargs="+",
        choices=METRICS,
        help="loss (and perplexity), exact (exact match), classify (accuracy against a label set); "
        "default: loss exact",
    )
    p.add_argument(
        "--embedder",
        help="for classify: an HF text-encoder folder (BERT, SentenceBERT) that matches answers to labels "
        "by cosine similarity, LTU's protocol (default: match by string)",
    )
    p.add_argument(
        "--labels",
        help="for classify: a file with one label per line (default: each task's distinct answers)",
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--tagger",
        help="with --suite and a soft-prompt export: its tagger from this folder (a moved or copied one)",
    )
    _add_placement(p)


def _eval(args) -> int:
    if args.suite:
        return _eval_suite(args)
    from .exported import soft_prompt_settings
    from .infer import TextEmbedder, evaluate
    from .report import report_table

    if not args.shards:
        raise UsageError("gama-ds eval needs --shards (held-out shard sets) or --suite (an evaluation suite)")
    if args.out or args.tagger:
        raise UsageError(
            f"{'--out' if args.out else '--tagger'} belongs to --suite (held-out shards hold their tags)"
        )
    args.metric = args.metric or ["loss", "exact"]
    if (args.embedder or args.labels) and "classify" not in args.metric:
        raise UsageError("--embedder and --labels belong to --metric classify")
    placement = _placement(args)
    labels = None
    if args.labels:
        try:
            with open(args.labels, encoding="utf-8") as f:
                labels = [line.strip() for line in f if line.strip()]
        except OSError as err:
            raise UsageError(f"{args.labels}: cannot read the labels file: {err.strerror}") from None
        if not labels:
            raise UsageError(f"{args.labels}: no labels (one per line)")
    if args.embedder and not os.path.isdir(args.embedder):
        raise UsageError(f"--embedder {args.embedder} is not a folder (an HF text-encoder folder)")
    embedder = TextEmbedder(args.embedder) if args.embedder else None
    model, tokenizer, info = _load_export(args, placement)
    prompt = info["prompt"]
    result = evaluate(
        model,
        tokenizer,
        args.shards,
        prompt["cutoff_len"],
        prompt["template"],
        args.batch_size,
        args.max_new_tokens,
        tuple(args.metric),
        prompt.get("train_on_inputs", True),
        embedder,
        labels,
        soft_prompt_settings(info),
    )
    result = {"device": str(placement[0]), "dtype": str(placement[1]).removeprefix("torch."), **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(report_table(result))
    return 0


def _eval_suite(args) -> int:
    from .evaluate.suite import read_suite
    from .evaluate.suite_run import run_suite
    from .evaluate.table import format_table

    given = [flag for flag, value in (("--shards", args.shards), ("--metric", args.metric),
             ("--embedder", args.embedder), ("--labels", args.labels)) if value]  # fmt: skip
    if given:
        raise UsageError(
            f"{given[0]} belongs to held-out shards, not --suite (the suite file names its sets)"
        )
    for flag, value in (("--max-new-tokens", 32), ("--batch-size", 8)):
        if getattr(args, flag[2:].replace("-", "_")) != value:
            raise UsageError(
                f"{flag}: with --suite, set it in the suite (generation.max_new_tokens, batch_size)"
            )
    if not args.out:
        raise UsageError("--suite needs --out DIR for the result rows and the report")
    suite = read_suite(args.suite)
    _placement(args)  # checked before any process group or model
    _export_info(args.model)
    report = run_suite(suite, args.model, args.out, args.device, args.dtype, args.llm, args.tagger, log=_log)
    if report is not None:
        print(json.dumps(report) if args.json else format_table(report))
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _add_score(sub) -> None:
    from .evaluate.datasets import DATASETS
    from .evaluate.embed import POOLINGS
    from .evaluate.score import PARSES

    p = sub.add_parser("score", help="score LTU-format result rows by LTU's protocol (Table 1's numbers)")
    p.add_argument("results", help="a JSON list of {prompt, pred, ref, audio_id} rows (ours or LTU's)")
    p.add_argument("--dataset", required=True, choices=DATASETS, help="whose answer, label and metric rules")
    p.add_argument("--labels", help="classification sets: the label CSV (LTU's index,mid,display_name)")
    p.add_argument("--embedder", help="classification sets: a local text-encoder folder (BERT, SentenceBERT)")
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        help="of the embedder (default: the folder's sentence-transformers one, else mean)",
    )
    p.add_argument(
        "--parse", choices=PARSES, help="ltu: LTU's answer cuts (default for LTU's sets); plain: whole answer"
    )
    p.add_argument("--metric", help="acc, micro_f1, map, cider_d or spice (default: the one Table 1 reports)")
    p.add_argument(
        "--spice-jar", help="captions: a spice-1.0.jar with CoreNLP in its lib/ (default: pycocoevalcap's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _score(args) -> int:
    from .evaluate.embed import TextEmbedder
    from .evaluate.score import score_results

    if args.pooling and not args.embedder:
        raise UsageError("--pooling belongs to --embedder")
    embedder = TextEmbedder(args.embedder, args.pooling) if args.embedder else None
    report = score_results(
        args.results, args.dataset, args.labels, embedder, args.parse, args.metric, args.spice_jar
    )
    if args.json:
        print(json.dumps(report))
        return 0
    used = f"parse {report['parse']['rule']}"
    if report["embedder"]:
        used += f", embedder {report['embedder']['path']} ({report['embedder']['pooling']} pooling)"
    print(f"{report['title']}: {report['metric']} = {report['value']:.4f} over {report['rows']} rows; {used}")
    if "spice_not_computed" in report:
        print(f"SPICE not computed: {report['spice_not_computed']}")
    for note in report["notes"]:
        print(f"note: {note}")
    return 0


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a small synthetic audio QA set (audio files + JSON)")
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=_positive_int, default=200, help="training clips (default 200)")
    p.add_argument("--test-clips", type=int, default=40, help="held-out clips (default 40)")
    p.add_argument("--seed", type=int, default=0)


def _synth(args) -> int:
    from .synth import synthesize

    paths = synthesize(args.out, args.clips, args.test_clips, args.seed)
    print(json.dumps(paths))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path on CPU: synthesise, convert, train on 2 ranks, export, evaluate",
    )
    p.add_argument("--out", default="demo_run", help="working folder (default demo_run)")
    p.add_argument("--clips", type=_positive_int, default=400, help="training clips (default 400)")
    p.add_argument("--test-clips", type=_positive_int, default=60, help="held-out clips (default 60)")
    p.add_argument("--epochs", type=_positive_int, default=6, help="training epochs (default 6)")
    p.add_argument("--ranks", type=_positive_int, default=2, help="DeepSpeed ranks (default 2)")
    p.add_argument(
        "--warmup-steps",
        type=_positive_int,
        default=700,
        help="steps of the encoder's warm-up before the stage (default 700)",
    )
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=0.9,
        help="exit 1 when the held-out accuracy is below this (default 0.9; 0 to only report)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe")


def _demo(args) -> int:
    from .demo import run_demo

    if not 0.0 <= args.min_accuracy <= 1.0:
        raise UsageError(f"--min-accuracy must be within [0, 1], got {args.min_accuracy}")
    result = run_demo(
        args.out,
        args.clips,
        args.test_clips,
        args.epochs,
        args.ranks,
        warmup_steps=args.warmup_steps,
        min_accuracy=args.min_accuracy,
        seed=args.seed,
        overrides=tuple(args.overrides),
    )
    return 0 if result["passed"] else 1


def _add_serve(sub) -> None:
    from .serve.options import API_KEY_ENV, ServeOptions

    d = ServeOptions(model="")
    p = sub.add_parser("serve", help="an export behind an OpenAI-compatible chat API and a web page")
    p.add_argument("--model", required=True, help="a gama-ds export folder")
    p.add_argument("--model-name", help="the model id clients send (default: the export folder's name)")
    p.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help=f"default {d.port}")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU when there is one)")
    p.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPUs that have it, else fp32)")
    p.add_argument("--llm", help="the export's base LLM from this folder (a moved or copied one)")
    p.add_argument(
        "--tagger", help="with a soft prompt: the export's tagger from this folder (a moved or copied one)"
    )
    p.add_argument(
        "--max-batch", type=int, default=d.max_batch, help=f"requests per batch (default {d.max_batch})"
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help=f"how long the oldest request waits for more to batch with (default {d.batch_wait_ms:g})",
    )
    p.add_argument(
        "--max-audio-s", type=float, default=d.max_audio_s, help=f"longest clip (default {d.max_audio_s:g})"
    )
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=d.max_request_mb,
        help=f"largest request body (default {d.max_request_mb:g})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_ENV}, else no key)",
    )


def _serve(args) -> int:
    from .serve.main import serve
    from .serve.options import ServeOptions

    return serve(
        ServeOptions(
            model=args.model,
            model_name=args.model_name,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            llm=args.llm,
            tagger=args.tagger,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            max_audio_s=args.max_audio_s,
            max_request_mb=args.max_request_mb,
            api_key=args.api_key,
        )
    )


COMMANDS = {
    "demo": (_add_demo, _demo),
    "convert": (_add_convert, _convert),
    "verify": (_add_verify, _verify),
    "tag": (_add_tag, _tag),
    "show": (_add_show, _show),
    "estimate": (_add_estimate, _estimate),
    "train": (_add_train, _train),
    "export": (_add_export, _export),
    "import": (_add_import, _import),
    "generate": (_add_generate, _generate),
    "eval": (_add_eval, _eval),
    "score": (_add_score, _score),
    "synth": (_add_synth, _synth),
    "serve": (_add_serve, _serve),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gama-ds", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gama_ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except GamaDsError as err:
        # What the user gave is wrong and the message says what: no traceback. Anything else
        # is a bug (ours or a library's) and propagates with its traceback, exit code 1.
        print(f"gama-ds {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
