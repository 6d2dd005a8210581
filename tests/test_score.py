"""`gama-ds score`: LTU's parse rules, decision, metrics and captioning protocol, on small files
written in LTU's own formats (result rows and label CSVs), with a real (tiny, random) BERT."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from conftest import write_json
from gama_ds.cli import main
from gama_ds.errors import UsageError
from gama_ds.evaluate import caption, classify, retrieval
from gama_ds.evaluate.embed import TextEmbedder
from gama_ds.evaluate.files import ScoreInputError
from gama_ds.evaluate.parse import ANSWER_RULES, TRUTH_RULES, caption_text
from gama_ds.evaluate.score import score_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Label files as LTU ships them: quoted names (ESC-50, VocalSound), single quotes (DCASE, TUT),
# underscores for commas (VGGSound) and spaces (FSD50K), commas inside quotes (AudioSet).
HEAD = "index,mid,display_name\n"
ESC_CSV = (
    HEAD
    + '0,/m/07rwj00,"dog"\n1,/m/07rwj01,"rooster"\n2,/m/07rwj20,"crying_baby"\n3,/m/07rwj11,"sea_waves"\n'
)
VS_CSV = 'index,mid,display_name\n0,/m/01j3sz,"Laughter"\n1,/m/07plz5l,"Sigh"\n2,/m/01b_21,"Cough"'
DCASE_CSV = HEAD + "0,/m/01j3sz,'Train horn'\n1,/m/07plz5l,'Air horn truck horn'\n2,/m/01b_21,'Car alarm'\n"
VGG_CSV = (
    "index,mid,display_name\n0,vgg_0,ambulance siren\n1,vgg_1,bird chirping_ tweeting\n2,vgg_2,dog barking\n"
)
FSD_CSV = (
    "index,mid,display_name\n0,/m/05tny_,Bark\n1,/m/0jbk,Animal\n2,/m/068hy,Domestic_animals_and_pets\n"
    "3,/m/0mkg,Accordion\n4,/m/07pp_mv,Alarm\n"
)
AS_CSV = HEAD + '0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n2,/m/0jbk,"Animal"\n'

WORDS = (
    "sound of a the dog rooster crying baby sea waves laughter sigh cough train air horn truck car alarm "
    "ambulance siren bird chirping tweeting barking bark animal domestic animals and pets accordion "
    "speech male man speaking barks cat meows loudly rain falls engine runs idles people talk"
).split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT folder, as a user's SentenceBERT or bert-large-uncased would be."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = [*specials, *dict.fromkeys(WORDS), ",", ".", '"', "/", "'"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def embedder(bert_dir):
    return TextEmbedder(bert_dir)


def rows(preds, refs, ids=None):
    ids = ids or [f"/data/clip{i}.wav" for i in range(len(preds))]
    prompt = "Close-ended question: Write an audio caption describing the sound."
    return [
        {"prompt": prompt, "pred": p, "ref": r, "audio_id": a}
        for p, r, a in zip(preds, refs, ids, strict=True)
    ]


def files(tmp_path, csv_text, preds, refs):
    labels = tmp_path / "labels.csv"
    labels.write_text(csv_text)
    return write_json(tmp_path / "results.json", rows(preds, refs)), str(labels)


def test_ltu_parse_rules_cut_answers_and_references_as_its_scripts_do():
    # LTU's `pred` starts with the tail of the alpaca prompt ("...Response:\n"): hence the cuts.
    a = ANSWER_RULES
    assert a["ltu_colon_lstrip"].apply("Response:\n  Crying baby") == "Crying baby"  # ESC-50
    assert a["ltu_colon_drop1"].apply("Response:\nLaughter") == "Laughter"  # VS, TUT, BJO, DCASE
    assert a["ltu_colon_drop1"].apply("e: a car: engine idles") == "engine idles"  # after the LAST ':'
    caption_pred = 'Audio caption: "A bird is chirping, tweeting."'
    assert a["ltu_audio_caption_drop2"].apply(caption_pred) == "A bird is chirping, tweeting."  # VGG, FSD, AS
    assert a["plain_answer"].apply("  Dog: barking \n") == "Dog: barking"
    t = TRUTH_RULES
    assert t["ltu_colon"].apply("crying_baby") == ["crying_baby"]
    assert t["ltu_colon_underscore"].apply("forest_path") == ["forest path"]  # TUT
    assert t["ltu_colon_no_shy_comma"].apply("Clapper\xad-drum,") == ["Clapper-drum"]  # BJO
    assert t["ltu_colon_no_comma"].apply("Air horn, truck horn") == ["Air horn truck horn"]  # DCASE
    assert t["ltu_colon_space_lower"].apply("Sound: Bird chirping, tweeting") == ["bird chirping, tweeting"]
    assert t["ltu_colon_space_multi"].apply("Labels: Speech; Male speech, man speaking") == [
        "Speech",
        "Male speech, man speaking",
    ]


def test_esc50_accuracy_by_hand_with_a_tiny_bert(tmp_path, embedder):
    # Each answer is one label's own text, so cosine 1 picks that label whatever the weights:
    # right on rows 1, 2, 4; wrong on 3 (sea waves for crying_baby) and 5 (rooster for dog).
    preds = [
        "Response:\nDog",
        "Response:\n Rooster",
        "Response:\nSea waves",
        "Response:\nsea waves",
        ":\nRooster",
    ]
    refs = ["dog", "rooster", "crying_baby", "sea_waves", "dog"]
    results, labels = files(tmp_path, ESC_CSV, preds, refs)
    report = score_results(results, "esc50", labels, embedder)
    assert report["metric"] == "acc" and report["value"] == pytest.approx(3 / 5) and report["rows"] == 5
    assert report["parse"]["rule"] == "ltu" and report["parse"]["answer"] == "pred.split(':')[-1].lstrip()"
    assert report["parse"]["clip_at_0"] is False and report["classes"] == 4
    assert report["embedder"]["pooling"] == "mean" and report["embedder"]["path"] == embedder.path
    assert any("2000" in note for note in report["notes"])  # LTU asserts all 2,000 clips
    # The plain rule takes the whole answer: every answer is now text before the label's.
    plain = score_results(results, "esc50", labels, embedder, parse="plain")
    assert plain["parse"]["rule"] == "plain" and plain["parse"]["answer"] == "pred.strip()"
    assert 0.0 <= plain["value"] <= 1.0


def test_dcase_micro_f1_is_top1_accuracy_and_clips_at_zero(tmp_path, embedder):
    preds = [
        "Response:\nTrain horn",
        "Response:\nCar alarm",
        "Response:\nAir horn truck horn",
        ":\nCar alarm",
    ]
    refs = ["Train horn", "Air horn, truck horn", "Air horn, truck horn", "Car alarm"]
    results, labels = files(tmp_path, DCASE_CSV, preds, refs)
    report = score_results(results, "dcase", labels, embedder)
    assert report["metric"] == "micro_f1" and report["parse"]["clip_at_0"] is True
    assert report["value"] == pytest.approx(3 / 4) == report["accuracy"] == report["micro_f1"]


def test_vggsound_matches_ltus_comma_names_and_vocalsound_reads_an_unterminated_csv(tmp_path, embedder):
    preds = [
        'Audio caption: "Bird chirping, tweeting"',
        'Audio caption: "Dog barking."',
        'Audio caption: "Dog barking"',
    ]
    refs = ["Sound: Bird chirping, tweeting", "Sound: ambulance siren", "Sound: Dog barking"]
    results, labels = files(tmp_path, VGG_CSV, preds, refs)
    report = score_results(results, "vgg", labels, embedder)
    # Row 2 names the wrong class; row 1 matches "bird chirping,  tweeting" (LTU's '_' -> ', ').
    assert report["value"] == pytest.approx(2 / 3) and report["parse"]["clip_at_0"] is True
    vs_results, vs_labels = files(
        tmp_path, VS_CSV, ["Response:\nSigh", "Response:\nCough"], ["Sigh", "Laughter"]
    )
    assert score_results(vs_results, "vs", vs_labels, embedder)["value"] == pytest.approx(1 / 2)


def test_cosine_decision_clips_at_zero_and_gives_ties_to_the_first_class():
    labels = [[1.0, 0.0], [0.0, 1.0]]
    answers = [[-2.0, -1.0], [1.0, 1.0], [0.2, 1.0]]  # all negative, a tie, a clear winner
    raw = classify.cosine_scores(answers, labels, clip=False)
    clipped = classify.cosine_scores(answers, labels, clip=True)
    assert raw[0].max() < 0
    assert classify.top1(raw).tolist() == [1, 0, 1]  # unclipped: the less negative class
    assert classify.top1(clipped).tolist() == [0, 0, 1]  # clipped: all zeros, class 0
    assert classify.tied_rows(raw) == 1 and classify.tied_rows(clipped) == 2
    reversed_labels = classify.cosine_scores(answers, labels[::-1], clip=False)
    assert classify.top1(reversed_labels).tolist() == [0, 0, 0]  # the tie follows label order


def test_micro_f1_of_one_hot_equals_accuracy_and_sklearn():
    rng = np.random.default_rng(0)
    predicted, truth = rng.integers(0, 7, 300), rng.integers(0, 7, 300)
    p, t = classify.one_hot(predicted, 7), classify.one_hot(truth, 7)
    ours = classify.micro_f1(p, t)
    assert (
        ours
        == pytest.approx(f1_score(t, p, average="micro"))
        == pytest.approx(classify.accuracy(predicted, truth))
    )
    assert classify.micro_f1(classify.one_hot([0, 1], 3), classify.one_hot([0, 1], 3)) == 1.0


def sklearn_aps(truth, scores):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found in y_true"
        return np.array([average_precision_score(truth[:, k], scores[:, k]) for k in range(truth.shape[1])])


def test_average_precision_matches_sklearn_with_ties_and_classes_without_positives():
    rng = np.random.default_rng(1)
    scores = np.round(rng.random((60, 8)), 1)  # one decimal: many tied scores
    truth = (rng.random((60, 8)) < 0.2).astype(float)
    truth[:, 3] = 0  # a class no clip has
    truth[:5, 5], truth[5:, 5] = 1, 0
    expected = sklearn_aps(truth, scores)
    assert expected[3] == 0.0  # what sklearn (and so LTU's mean) counts for it
    assert np.allclose(retrieval.class_average_precisions(truth, scores), expected, atol=1e-12)
    result = retrieval.mean_average_precision(truth, scores)
    assert result["map"] == pytest.approx(expected.mean())
    assert result["map_present"] == pytest.approx(np.delete(expected, 3).mean())
    assert (result["classes"], result["classes_present"]) == (8, 7)


def test_fsd50k_map_over_all_classes_against_sklearn(tmp_path, embedder):
    preds = [
        'Audio caption: "Bark"',
        'Audio caption: "Domestic animals and pets"',
        'Audio caption: "Alarm"',
        'Audio caption: "a dog barks loudly"',
    ]
    refs = [
        "Labels: Bark; Animal",
        "Labels: Domestic animals and pets; Animal",
        "Labels: Alarm",
        "Labels: Bark",
    ]
    results, labels = files(tmp_path, FSD_CSV, preds, refs)
    report = score_results(results, "fsd50k", labels, embedder)
    # The same cosines, scored by sklearn: Accordion has no positive and counts 0.
    answers = embedder([f"sound of {p.split('Audio caption')[-1][3:-1].lower()}" for p in preds])
    names = ["bark", "animal", "domestic animals and pets", "accordion", "alarm"]
    scores = classify.cosine_scores(answers, embedder([f"sound of {n}" for n in names]), clip=False)
    truth = np.array([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]], dtype=float)
    expected = sklearn_aps(truth, scores)
    assert report["metric"] == "map" and report["parse"]["clip_at_0"] is False
    assert report["value"] == pytest.approx(expected.mean(), abs=1e-6)
    assert report["map_present"] == pytest.approx(expected[[0, 1, 2, 4]].mean(), abs=1e-6)
    assert report["classes_present"] == 4 and report["value"] < report["map_present"]


def test_cider_d_against_pycocoevalcap_and_by_hand():
    from pycocoevalcap.cider.cider import Cider

    refs = [
        [
            "a dog barks twice",
            "a dog is barking",
            "dog barking loudly",
            "a small dog barks",
            "a dog barks nearby",
        ],
        [
            "rain falls on a roof",
            "heavy rain falls",
            "rain is falling",
            "it rains on a roof",
            "rain pours down",
        ],
        [
            "a car engine idles",
            "an engine runs",
            "a car idles",
            "a vehicle engine idles",
            "an idling car engine",
        ],
    ]
    cands = ["a dog barks loudly", "rain falls on a metal roof", "people talk"]
    ours = caption.cider_d(cands, refs)
    mean, theirs = Cider().compute_score(
        {i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)}
    )
    assert np.allclose(ours, theirs, atol=1e-9) and ours.mean() == pytest.approx(mean)
    # By hand: with two clips "a" is in both (idf 0). An exact copy of its one reference has
    # cosine 1 for 1-, 2- and 3-grams and no 4-gram: 10 * 3/4. "a cat" against "a cat meows":
    # cosine 1/sqrt(2) for 1- and 2-grams, no 3- or 4-gram, one word short.
    hand = caption.cider_d(["a dog barks", "a cat"], [["a dog barks"], ["a cat meows"]])
    assert hand[0] == pytest.approx(7.5)
    assert hand[1] == pytest.approx(10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72))


def test_captioning_averages_five_trials_and_needs_five_rows_per_clip(tmp_path):
    from pycocoevalcap.cider.cider import Cider

    refs = {
        "a.wav": [
            "A dog barks.",
            "A dog is barking!",
            "Dog barking, loudly.",
            "A small dog barks",
            "A dog barks nearby",
        ],
        "b.wav": [
            "Rain falls on a roof.",
            "Heavy rain falls",
            "Rain is falling",
            "It rains on a roof",
            "Rain pours down.",
        ],
    }
    trials = {
        "a.wav": ["a dog barks", "A dog barks loudly.", "a cat meows", "dog", "a dog is barking"],
        "b.wav": ["rain falls", "rain", "Rain falls on a roof!", "an engine runs", "heavy rain"],
    }
    # LTU's rows: one per (clip, reference), the clip's rows not necessarily together.
    order = [("a.wav", 0), ("b.wav", 0), ("a.wav", 1), ("b.wav", 1), ("b.wav", 2), ("a.wav", 2)]
    order += [(c, t) for t in (3, 4) for c in ("a.wav", "b.wav")]
    prompt = "Close-ended question: Write an audio caption describing the sound, in AudioCaps style."
    data = [
        {"prompt": prompt, "pred": f"Response: {trials[c][t]}", "ref": f"Caption: {refs[c][t]}",
         "audio_id": f"/audiocaps/test/{c}"}
        for c, t in order
    ]  # fmt: skip
    results = write_json(tmp_path / "audiocaps.json", data)
    spice_jar = tmp_path / "spice" / "spice-1.0.jar"  # a jar without CoreNLP beside it
    spice_jar.parent.mkdir()
    spice_jar.write_bytes(b"")
    report = score_results(results, "audiocaps", spice_jar=str(spice_jar))

    gts = {c: [caption_text(r) for r in refs[c]] for c in refs}
    expected = [
        Cider().compute_score(gts, {c: [caption_text(trials[c][t])] for c in refs})[0] for t in range(5)
    ]
    assert report["metric"] == "cider_d" and report["clips"] == 2 and report["rows"] == 10
    assert np.allclose(report["cider_d_trials"], expected) and len(set(np.round(expected, 6))) == 5
    assert report["value"] == pytest.approx(np.mean(expected))
    assert report["spice"] is None and "CoreNLP" in report["spice_not_computed"]
    with pytest.raises(UsageError, match="SPICE cannot run here"):
        score_results(results, "audiocaps", metric="spice", spice_jar=str(spice_jar))
    short = write_json(tmp_path / "short.json", data[:-1])
    with pytest.raises(ScoreInputError, match=r"short\.json: clip 'b\.wav' has 4 rows"):
        score_results(short, "clotho")


def test_clothoaqa_is_ours_exact_match_after_normalising(tmp_path):
    results = write_json(
        tmp_path / "aqa.json",
        rows(["Yes, a dog barks.", "no", "Three", "yesterday"], ["yes", "yes", "three", "yes"]),
    )
    report = score_results(results, "clothoaqa")
    assert report["value"] == pytest.approx(2 / 4) and report["parse"]["rule"] == "plain"
    with pytest.raises(UsageError, match="no LTU script"):
        score_results(results, "clothoaqa", parse="ltu")


def test_bad_rows_and_unknown_labels_name_the_file_and_row(tmp_path, embedder):
    results, labels = files(tmp_path, ESC_CSV, ["Response:\nDog", ":\nCow", ":\nDog"], ["dog", "dog", "cow"])
    with pytest.raises(ScoreInputError, match=r"results\.json: row 3: reference 'cow' names class 'cow'"):
        score_results(results, "esc50", labels, embedder)
    broken = write_json(tmp_path / "broken.json", [*rows(["x"], ["dog"]), {"pred": "x", "audio_id": "a.wav"}])
    with pytest.raises(ScoreInputError, match=r"broken\.json: row 2: 'ref' is missing"):
        score_results(broken, "esc50", labels, embedder)
    header = tmp_path / "header.csv"
    header.write_text("index,mid,name\n0,/m/0,dog\n")
    with pytest.raises(ScoreInputError, match=r"header\.csv: line 1: no display_name column"):
        score_results(results, "esc50", str(header), embedder)
    with pytest.raises(UsageError, match="needs --labels"):
        score_results(results, "esc50", None, embedder)


def test_the_embedder_states_its_pooling_and_reads_a_sentence_transformers_folder(
    bert_dir, embedder, tmp_path
):
    folder = shutil.copytree(bert_dir, tmp_path / "st")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    st = TextEmbedder(str(folder))
    texts = ["sound of dog barking", "sound of rain"]
    assert st.describe()["pooling"] == "cls"
    assert torch.allclose(st(texts), TextEmbedder(bert_dir, "cls")(texts))
    assert not torch.allclose(st(texts), embedder(texts))
    # One text alone or in a padded batch: the same vector (padding is masked out of the mean).
    assert torch.allclose(embedder(texts)[1], embedder(texts[1:])[0], atol=1e-6)


def test_score_command_end_to_end(tmp_path, bert_dir, capsys):
    results, labels = files(tmp_path, AS_CSV, ['Audio caption: "Male speech, man speaking"'] * 2, [
        "Labels: Speech; Male speech, man speaking", "Labels: Animal"])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gama_ds", "score", results, "--dataset", "as", "--labels", labels]
    done = subprocess.run(
        [*cmd, "--embedder", bert_dir, "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert {"dataset": "as", "metric": "map", "rows": 2}.items() <= report.items()
    assert report["embedder"]["path"] == os.path.abspath(bert_dir) and report["embedder"]["pooling"] == "mean"
    assert report["parse"]["answer"].startswith("pred.replace") and 0 < report["value"] <= 1
    # In-process: a missing embedder is a one-line error, exit 2.
    assert main(["score", results, "--dataset", "as", "--labels", labels]) == 2
    assert "needs --labels" in capsys.readouterr().err
