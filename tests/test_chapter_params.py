"""Value rules of every chapter: the shipped defaults pass, impossible values fail with their name."""

import pytest
import yaml

from atlas_core.book import runner
from atlas_core.book.chapter_params import RULES, ParameterValueError, check_values
from atlas_core.zoo import ModelError


def defaults(chapter):
    return runner.notebook_parameters(runner.read_notebook(runner.notebook_source(chapter)))


def test_every_chapter_has_rules():
    assert set(RULES) == set(runner.CHAPTERS)


@pytest.mark.parametrize("chapter", runner.CHAPTERS)
def test_shipped_defaults_pass(chapter):
    check_values(chapter, defaults(chapter))


@pytest.mark.parametrize("chapter, name, value, message", [
    ("nqp", "bits", [8, 4, 3, 1], "bits must be an integer in 2..16"),  # WQuantSpec's rule
    ("nqp", "methods", ["rtn", "magic"], "unknown ['magic']"),
    ("nqp", "calib_blocks", 0, "must be ≥ 1"),
    ("nqp", "eval_blocks", 1, "the intervals resample these blocks"),  # one block: a point, not an interval
    ("nqp", "bits", [4, 3], "add [8]"),
    ("nqp", "methods", ["rtn", "gptq"], "add ['awq'"),
    ("nqp", "grouped_methods", ["rtn"], "add ['gptq', 'awq', 'rot-fisher']"),
    ("atlas", "k_sweep", [5, 6], "must contain the headline k"),
    ("atlas", "n_points", 10**6, "positions"),
    ("atlas", "metric", "cosine", "choose from source, projection"),
    ("atlas", "intra_null_draws", 1, "n_draws must be an integer ≥ 2"),
    ("crossarch", "mid_depth", 1.5, "must lie in [0.0, 1.0]"),
    ("crossarch", "mid_depth", float("nan"), "must be a finite number"),
    ("crossarch", "seeds", [], "needs at least one value"),
    ("crossarch", "intra_null_draws", 1, "must be ≥ 2"),
    ("kvquant", "prefill", 511, "must be in 1..510 for seq_len 512"),  # EvalSetup.check_block  # passed before, then failed inside the kernel
    ("kvquant", "eval_blocks", 1, "must be ≥ 2"),  # one block: a zero-width interval and a verdict
    ("sparse", "eval_blocks", 1, "must be ≥ 2"),
    ("kvquant", "ranks", [8, -1], "each must be ≥ 1"),
    ("kvquant", "engine", "fast", "engine must be one of ('onepass', 'decode')"),  # EvalSetup's rule
    ("kvquant", "a2_budget", 2, "the A² value policy needs"),  # KVMethod's rule: low 2 bits < vbits
    ("kvquant", "a2_budget", 9, "vbits must be an integer in 1..8"),
    ("kvquant", "eval_blocks", 0, "must be ≥ 1"),
    ("kvquant", "bits", [2, 4], "compares [2, 3]"),
    ("kvquant", "kv_bits", [2, 9], "kbits must be an integer in 1..8"),  # KVMethod's rule, not a copy
    ("sparse", "window", 0, "must be ≥ 1"),
    ("sparse", "sweep_gen_tokens", 5000, "exceeds gen_tokens"),
    ("sparse", "sweep_blocks", 17, "exceeds eval_blocks"),
    ("sparse", "sweep_blocks", 0, "must be ≥ 1"),
    ("sparse", "seq_len", 64, "too short for the rule a + W + k = 385"),
    ("sparse", "seq_len", 256, "use at least 387"),  # the sweep's W = 256, k = 128 (passed before)
    ("sparse", "supports", [97, 100], "must be a + W + P·r with r ≥ 1"),  # blocks.block_rule's rule
    ("sparse", "survival_gen_tokens", 1, "must be ≥ 2"),
    ("sparse", "certified_eps", [1e-2, 1e-3, 1.5], "eps must be a number in (0, 1)"),  # SparseConfig's rule
    ("sparse", "certified_eps", [1e-3, "a"], "eps must be a number in (0, 1)"),
    ("sparse", "certified_eps", [1e-2, 1e-4], "compares [0.001]"),
    ("sparse", "certified_eps", [], "needs at least one value"),
    ("sparse", "certified_bound", "tight", "choose from minmax"),
    ("sparse", "certified_blocks", 1, "must be ≥ 2"),
    ("sparse", "certified_survival_prompts", 0, "must be ≥ 1"),
    ("sparse", "certified_prompt_tokens", 60, "use at least 67"),  # a + W + 2 with k = 0
    ("sparse", "certified_prompt_tokens", 10**6, "positions"),
    ("sparse", "certified_corpus", "no-such-corpus", "unknown corpus"),
    ("models", "ppl_tokens", 1000, "multiple of ppl_seq_len"),
    ("ablation", "variants", ["base", "gqa3"], "unknown ['gqa3']"),  # 4 heads: no 3 KV heads
    ("ablation", "d_heads", [32, 33], "d_head must be even under RoPE"),  # ArchConfig's rule
    ("ablation", "tokens", 100, "must cover at least one step"),  # TrainConfig's rule
    ("ablation", "k", 32, "k = 32"),  # not below the base's d_head 32
    ("ablation", "n_layers", 1, "must be ≥ 2"),
    ("ablation", "device", "tpu", "choose from cpu, cuda, auto"),
    ("ablation", "variants", ["mqa"], "needs a variant with more than one KV head"),  # failed in the kernel
    ("ablation", "seeds", [0, 0], "lists a value twice"),
    ("ablation", "variants", ["base", "base"], "lists a value twice"),
    ("ablation", "lr", 0.0, "lr must be a finite number above 0"),  # was blamed on 'tokens'
    ("ablation", "eval_blocks", 100000, "holds 9622 blocks"),  # failed in the kernel
    ("models", "corpora", ["britannica", "no-such-corpus"], "unknown corpus"),
])
def test_impossible_values_are_named(chapter, name, value, message):
    with pytest.raises(ParameterValueError, match=rf"parameter '{name}'.*{__import__('re').escape(message)}"):
        check_values(chapter, {**defaults(chapter), name: value})


def test_sparse_survival_needs_a_support_that_drops_keys():
    with pytest.raises(ParameterValueError, match="parameter 'survival_prompt_tokens'.*every support keeps every key"):
        check_values("sparse", {**defaults("sparse"), "survival_prompt_tokens": 64, "survival_gen_tokens": 8})


def test_unknown_models_fail_before_loading(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="^parameter 'model': unknown model 'no such model!'"):  # the value once
        check_values("atlas", {**defaults("atlas"), "model": "no such model!"})
    with pytest.raises(ModelError, match=r"^parameter 'models' = \['someone/not-cached-anywhere'\]: unknown model "
                                         ".*not in the local Hugging Face cache"):
        check_values("models", {**defaults("models"), "models": ["someone/not-cached-anywhere"]})
    with pytest.raises(ModelError, match="^parameter 'other_models' = 'smollm2-135m,nope': unknown model 'nope'"):
        check_values("sparse", {**defaults("sparse"), "other_models": "smollm2-135m,nope"})


def test_the_runner_rejects_impossible_values_before_executing(tmp_path, monkeypatch):
    import papermill

    def boom(*args, **kwargs):
        raise AssertionError("executed although a value was impossible")

    monkeypatch.setattr(papermill, "execute_notebook", boom)
    with pytest.raises(runner.ParameterError, match="parameter 'window' = 0"):
        runner.run_chapter("sparse", "smollm2-135m", {"window": "0"}, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- issue 16: every rule once, every list element checked, no traceback ------------------------------------

@pytest.mark.parametrize("chapter, given, name, message", [
    # passed the pre-check (off by one: the kernel needs a + W + k + 2 tokens), then failed inside the kernel
    ("sparse", {"seq_len": 98, "windows": [64], "topks": [32]}, "seq_len", "use at least 195"),  # pages at 4k: 193
    # the prompt was never checked against the rules' budgets: failed in the kernel
    ("sparse", {"prompt_tokens": 50}, "prompt_tokens", "must exceed the budget a + W + k = 385"),
    # the sweep's W = 2048: failed in the kernel after the 1,500-token dense generation
    ("sparse", {"seq_len": 4096, "windows": [2048]}, "prompt_tokens", "must exceed the budget a + W + k = 2177"),
    ("sparse", {"contexts": [64, 4096]}, "contexts", "every context (64 tokens) must exceed the budget"),
    ("kvquant", {"bits": [2.5, 4]}, "bits", "must be integers; 2.5 is not"),
    ("nqp", {"bits": [2.5, 4]}, "bits", "must be integers; 2.5 is not"),
    ("sparse", {"topks": [0, 64.0]}, "topks", "must be integers; 64.0 is not"),
    ("atlas", {"k_sweep": [4, 7, 7.5]}, "k_sweep", "must be integers; 7.5 is not"),
    ("crossarch", {"seeds": [0, True]}, "seeds", "must be integers; True is not"),
    ("sparse", {"topks": ["a"]}, "topks", "must be integers; 'a' is not"),  # crashed the validator (TypeError)
    # k = d_head: O_h = 1.0 with a 'significant' z was published (atlas overlap --k 16 refuses it)
    ("atlas", {"model": "toy-llama", "k": 16, "k_sweep": [16]}, "k", "1 <= k < d = 16"),
    ("atlas", {"model": "toy-llama", "k_sweep": [7, 16]}, "k_sweep", "1 <= k < d = 16"),
    ("crossarch", {"models": ["toy-llama"], "k_range": [7, 20]}, "k_range", "1 <= k < d = 16"),
    ("kvquant", {"ranks": [1, 8, 65]}, "ranks", "rank (65) must be at most d_head (64)"),  # smollm2: d_head 64
    ("kvquant", {"rank": 72}, "rank", "rank (72) must be at most d_head (64)"),
    ("kvquant", {"side_bits": 9}, "side_bits", "side_bits must be an integer in 1..8"),
    # the model-free rule first (the offline study's per-channel groups of seq_len's tokens), then the head's rule
    ("kvquant", {"group": 48}, "group", "per-channel quantization needs a multiple of 48 tokens, got 512"),
    ("kvquant", {"group": 48, "seq_len": 480}, "group", "per-token group 48 does not divide d_head=64"),
    ("kvquant", {"group": 1}, "group", "group must be an integer ≥ 1"),  # HeadQ 2b's budget runs group // 2
    ("kvquant", {"metric_layers": "first,99"}, "metric_layers", "does not exist"),
    ("kvquant", {"metric_blocks": 40}, "metric_blocks", "exceeds eval_blocks"),
    ("nqp", {"group": 100}, "group", "does not divide the layer's 576 input columns"),  # smollm2: 576 and 1536
    ("nqp", {"gptq_calib_tokens": 100}, "gptq_calib_tokens", "must be at least seq_len"),
    ("models", {"ppl_seq_len": 1, "ppl_tokens": 4}, "ppl_seq_len", "seq_len must be an integer of at least 2"),
    # found by the fresh-user test of this issue: each started the kernel and ended in a traceback
    ("atlas", {"model": "toy-gpt2", "seq_len": 1024}, "seq_len", "longer than the 512 positions of toy-gpt2"),
    ("models", {"models": ["toy-gpt2"], "ppl_seq_len": 1024, "ppl_tokens": 2048}, "ppl_seq_len", "512 positions"),
    ("kvquant", {"model": "toy-llama", "calib_blocks": 100000, "seq_len": 160, "prefill": 32}, "calib_blocks",
     "were asked for"),  # more blocks than the corpus split holds
    ("kvquant", {"model": "toy-llama", "seq_len": 160, "prefill": 32, "group": 64, "ranks": [1, 8], "rank": 8}, "group",
     "per-channel quantization needs a multiple of 64 tokens, got 160"),
    ("crossarch", {"models": ["toy-llama"], "model": "toy-llama", "n_deep": 5}, "n_deep", "2 layers of toy-llama"),
    ("nqp", {"model": "toy-llama", "seq_len": 64, "group": 32, "gptq_calib_tokens": 10**7}, "gptq_calib_tokens",
     "were asked for"),
    ("sparse", {"model": "toy-llama", "other_models": "", "seq_len": 400, "prompt_tokens": 100000}, "prompt_tokens",
     "positions of toy-llama"),
])
def test_fault_cases_are_refused_before_any_kernel(chapter, given, name, message):
    import re

    with pytest.raises(ParameterValueError, match=rf"^parameter '{name}'.*{re.escape(message)}"):
        check_values(chapter, {**defaults(chapter), **given})


INT_LISTS = [("atlas", "k_sweep"), ("crossarch", "k_range"), ("crossarch", "seeds"), ("kvquant", "bits"),
             ("kvquant", "kv_bits"), ("kvquant", "ranks"), ("nqp", "bits"), ("sparse", "windows"), ("sparse", "topks"),
             ("sparse", "supports"), ("sparse", "contexts"), ("kvquant", "code_bits"), ("kvquant", "code_kv_bits"),
             ("kvquant", "speed_contexts"), ("ablation", "seeds"), ("ablation", "d_heads")]
NAME_LISTS = [("models", "models"), ("models", "corpora"), ("crossarch", "models"), ("crossarch", "corpora"),
              ("nqp", "methods"), ("nqp", "grouped_methods"), ("ablation", "variants")]
FLOAT_LISTS = [("sparse", "certified_eps")]  # each element checked by the library's rule (test_impossible_values_are_named)


def test_key_code_parameters_are_checked_by_the_librarys_rules():
    toy = {**defaults("kvquant"), "model": "toy-llama", "eval_blocks": 2, "calib_blocks": 2, "seq_len": 160, "prefill": 32,
           "ranks": [1, 8], "step_ctx": 64, "speed_contexts": [256, 512]}
    check_values("kvquant", toy)  # the chapter test's toy settings pass
    with pytest.raises(ParameterValueError, match=r"^parameter 'code_families'.*families must be among"):
        check_values("kvquant", {**toy, "code_families": "kivi-3"})
    with pytest.raises(ParameterValueError, match=r"^parameter 'code_kv_families'.*distinct"):
        check_values("kvquant", {**toy, "code_kv_bits": [2, 2]})
    with pytest.raises(ParameterValueError, match=r"^parameter 'speed_contexts'.*--context must be integers ≥ 64"):
        check_values("kvquant", {**toy, "speed_contexts": [32]})
    with pytest.raises(ParameterValueError, match=r"^parameter 'step_ctx'"):
        check_values("kvquant", {**toy, "step_ctx": 10**9})


def test_every_list_parameter_is_listed():
    """The lists above are every list parameter of every chapter (a new one must be added to them)."""
    found = {(c, n) for c in runner.CHAPTERS for n, v in defaults(c).items() if isinstance(v, list)}
    assert found == set(INT_LISTS) | set(NAME_LISTS) | set(FLOAT_LISTS)


@pytest.mark.parametrize("chapter, name", INT_LISTS)
@pytest.mark.parametrize("bad", [2.5, 4.0, True, "a", None, [4]])
def test_integer_lists_check_every_element(chapter, name, bad):
    value = defaults(chapter)[name] + [bad]
    with pytest.raises(ParameterValueError, match=rf"^parameter '{name}' = .*must be integers; {__import__('re').escape(repr(bad))} is not"):
        check_values(chapter, {**defaults(chapter), name: value})


@pytest.mark.parametrize("chapter, name", INT_LISTS)
def test_integer_lists_check_ranges_and_emptiness(chapter, name):
    low = 0 if name in ("seeds", "topks") else 1
    with pytest.raises(ParameterValueError, match=rf"^parameter '{name}' = .*each must be ≥ {low}"):
        check_values(chapter, {**defaults(chapter), name: defaults(chapter)[name] + [low - 1]})
    with pytest.raises(ParameterValueError, match=rf"^parameter '{name}' = \[\]: needs at least one value"):
        check_values(chapter, {**defaults(chapter), name: []})


@pytest.mark.parametrize("chapter, name", NAME_LISTS)
@pytest.mark.parametrize("bad", [3, None, True, ["britannica"]])
def test_name_lists_check_every_element(chapter, name, bad):
    with pytest.raises(ParameterValueError, match=rf"^parameter '{name}' = .*is not"):
        check_values(chapter, {**defaults(chapter), name: defaults(chapter)[name] + [bad]})


@pytest.mark.parametrize("chapter, name", [("atlas", "k"), ("crossarch", "k"), ("kvquant", "rank"), ("sparse", "window"),
                                           ("sparse", "topk"), ("nqp", "group"), ("kvquant", "side_bits")])
@pytest.mark.parametrize("bad", [2.5, True, "7"])
def test_integer_scalars_are_integers(chapter, name, bad):
    """A value that reaches check_values by the Python API (YAML, a test) is checked too, not only the CLI's."""
    with pytest.raises(ParameterValueError, match=rf"^parameter '{name}' = .*must be an integer"):
        check_values(chapter, {**defaults(chapter), name: bad})


def test_one_bit_keys_follow_the_librarys_rule():
    """Bits were 1..8 in the library and 2..8 in the pre-check; now KVMethod's rule alone: 1..8."""
    check_values("kvquant", {**defaults("kvquant"), "bits": [1, 2, 3]})


def test_a_bad_list_element_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    """`atlas run sparse -p topks '["a"]'`: exit 2, one line naming the parameter, no traceback, nothing run."""
    import papermill

    from atlas_core.book.cli import main

    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    for param, value in (("topks", '["a"]'), ("seq_len", "98"), ("prompt_tokens", "50"), ("seeds", "[0, true]")):
        chapter = "crossarch" if param == "seeds" else "sparse"
        extra = ["-p", "windows", "[64]", "-p", "topks", "[32]"] if param == "seq_len" else []
        assert main(["run", chapter, "--out", str(tmp_path), "-p", param, value, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"parameter '{param}'" in err and "Traceback" not in err, err


def test_the_documented_parameter_sets_in_params_yaml_pass_the_pre_check():
    """The commented-out sets in workflow/params.yaml (the full ablation for the cluster), uncommented as the
    file tells a reader to (delete "# "), parse and pass their chapter's rules."""
    text = runner.PARAMS_FILE.read_text()
    lines = text.splitlines()
    documented = [i for i, line in enumerate(lines) if line.lstrip().startswith("# ") and ": {" in line
                  and line.split("# ", 1)[1].split(":")[0].strip() in runner.CHAPTERS]
    assert documented, "no documented parameter set found in workflow/params.yaml"
    for i in documented:
        lines[i] = lines[i].replace("# ", "", 1)
        j = i + 1
        while not lines[i].rstrip().endswith("}"):
            lines[i] += " " + lines[j].replace("#", "", 1).strip()
            lines[j] = ""
            j += 1
    table = yaml.safe_load("\n".join(lines))
    sets = [(chapter, values) for chapters in table.values() for chapter, values in (chapters or {}).items()
            if chapter == "ablation"]
    assert sets
    for chapter, values in sets:
        check_values(chapter, {**defaults(chapter), **runner.validate_parameters(defaults(chapter), values)})


def test_a_variant_that_n_heads_does_not_allow_names_n_heads():
    """3 heads allow no 2 KV heads: the default variants' gqa2 is refused with the head count that rules it out
    (it was refused as merely 'unknown')."""
    with pytest.raises(ParameterValueError, match=r"parameter 'variants' = .*unknown \['gqa2'\] with n_heads = 3"):
        check_values("ablation", {**defaults("ablation"), "n_heads": 3})


@pytest.mark.parametrize("chapter, corpus_name", [("nqp", "corpus"), ("kvquant", "corpus"), ("sparse", "corpus"),
                                                  ("crossarch", "corpora")])
def test_a_corpus_too_short_for_the_blocks_names_the_corpus_parameter(tmp_path, chapter, corpus_name):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a tiny corpus with few words.")
    value = [str(tiny)] if corpus_name == "corpora" else str(tiny)
    with pytest.raises(ParameterValueError, match=f"with '{corpus_name}' = .*tiny.txt.*holds 0 blocks"):
        check_values(chapter, {**defaults(chapter), corpus_name: value})


def test_a_fixed_corpus_too_short_names_only_the_size(monkeypatch):
    """The invariant blocks read britannica whatever the parameters: no corpus parameter to name."""
    from atlas_core.book import chapter_params

    assert chapter_params._corpus_parameter({"corpus": "plays", "seq_len": 8}, "britannica") is None
    assert chapter_params._corpus_parameter({"certified_corpus": "plays"}, "plays") == "certified_corpus"


# --- the rules that need no model run before any rule that reads one ---------------------------------------

def _no_model(monkeypatch):
    """A tripwire on every way a rule consults a model (its name, config or tokenizer), in ``models`` and
    wherever ``chapter_params`` holds them, caches emptied."""
    from atlas_core import models
    from atlas_core.book import chapter_params

    def trip(*args, **kwargs):
        raise AssertionError(f"the model was consulted {args} before a value that needs none was refused")

    for name in ("describe", "load_tokenizer", "model_config", "check_positions", "check_model_name"):
        monkeypatch.setattr(models, name, trip)
        monkeypatch.setattr(chapter_params, name, trip, raising=False)
    for cached in (chapter_params._shape, chapter_params._tokenizer, chapter_params._linear_widths):
        cached.cache_clear()


MODEL_FREE = [  # (chapter, parameter, value, message): refusable without the model, by a count, a type or a config
    ("atlas", "k", -3, "must be ≥ 1 (a count)"), ("atlas", "k", 0, "must be ≥ 1 (a count)"),
    ("atlas", "n_points", -3, "must be ≥ 1"), ("atlas", "k_sweep", [7, -3], "each must be ≥ 1"),
    ("atlas", "seq_len", -3, "must be ≥ 1"), ("atlas", "k", 2.5, "must be an integer"),
    ("crossarch", "k", -3, "must be ≥ 1 (a count)"), ("crossarch", "n_deep", -3, "must be ≥ 1"),
    ("crossarch", "k_range", [-3], "each must be ≥ 1"), ("crossarch", "mid_depth", float("nan"), "must be a finite number"),
    ("kvquant", "rank", -3, "must be ≥ 1 (a count)"), ("kvquant", "group", 0, "must be ≥ 1"),
    ("kvquant", "ranks", [8, -3], "each must be ≥ 1"), ("kvquant", "speed_contexts", [-3], "each must be ≥ 1"),
    ("kvquant", "code_bits", [0], "each must be ≥ 1"), ("kvquant", "step_ctx", -3, "must be ≥ 0"),
    ("nqp", "group", -3, "must be ≥ 1 (a count)"), ("nqp", "eval_blocks", -3, "must be ≥ 1"),
    ("nqp", "gptq_calib_tokens", -3, "must be ≥ 1"),
    ("sparse", "window", -3, "must be ≥ 1 (a count)"), ("sparse", "topk", -3, "must be ≥ 0"),
    ("sparse", "certified_prompt_tokens", -3, "must be ≥ 1"), ("sparse", "gen_tokens", 0, "must be ≥ 1"),
    ("models", "ppl_seq_len", -3, "must be ≥ 1 (a count)"), ("models", "invariant_blocks", 0, "must be ≥ 1"),
    ("ablation", "k", -3, "must be ≥ 1 (a count)"), ("ablation", "d_model", 0, "must be ≥ 1"),
    ("ablation", "lr", float("inf"), "must be a finite number"),
    # the library's configs, which need no model either
    ("atlas", "intra_null_draws", 1, "n_draws must be an integer ≥ 2"),
    ("atlas", "n_points", 10**6, "positions"),  # CloudSpec: more points than the blocks hold
    ("kvquant", "prefill", 511, "must be in 1..510 for seq_len 512"), ("kvquant", "kv_bits", [2, 9], "kbits must be"),
    ("kvquant", "group", 48, "per-channel quantization needs a multiple of 48 tokens"),
    ("nqp", "bits", [8, 4, 3, 1], "bits must be an integer in 2..16"),
    ("sparse", "seq_len", 64, "too short for the rule"), ("sparse", "certified_eps", [1e-3, 1.5], "eps must be"),
    ("models", "ppl_seq_len", 1, "seq_len must be an integer of at least 2"),  # BlockSpec
    ("ablation", "d_heads", [32, 33], "d_head must be even under RoPE"),
]


@pytest.mark.parametrize("chapter, name, value, message", MODEL_FREE)
def test_values_that_need_no_model_are_refused_before_it_is_read(chapter, name, value, message, monkeypatch):
    """`atlas run atlas -p k -3` was refused only after the model's config and tokenizer were read (~9 s)."""
    given = {**defaults(chapter), name: value}
    _no_model(monkeypatch)
    with pytest.raises(ParameterValueError, match=rf"^parameter '{name}' = .*{__import__('re').escape(message)}"):
        check_values(chapter, given)


def test_the_tripwire_catches_a_rule_that_reads_the_model(monkeypatch):
    """The test above would pass vacuously if no rule read the model through these names."""
    given = {**defaults("atlas"), "k": 64, "k_sweep": [7, 64]}  # k < d_head: refusable only with the model's shape
    _no_model(monkeypatch)
    with pytest.raises(AssertionError, match="the model was consulted"):
        check_values("atlas", given)


def test_every_chapter_pauses_once_between_its_model_free_rules_and_the_rest():
    import inspect

    assert all(inspect.isgeneratorfunction(rule) for rule in RULES.values())


def test_a_negative_count_imports_neither_torch_nor_transformers():
    """The refusal comes back in the time of an import: nothing model-related is imported for it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from atlas_core.book.cli import main\n"
            "for chapter, name in (('atlas', 'k'), ('crossarch', 'n_deep'), ('kvquant', 'rank'), ('sparse', 'window')):\n"
            "    assert main(['run', chapter, '--model', 'smollm2-135m', '-p', name, '-3']) == 2\n"
            "heavy = sorted({'torch', 'transformers'} & set(sys.modules))\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("atlas: error: parameter '") and "must be ≥ 1" in line
                                   for line in lines), lines
