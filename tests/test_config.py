"""Config loading, overrides, validation and saving."""

from dataclasses import replace

import pytest
import yaml

from prime_scale.radix import resolve_base
from prime_scale.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    available_configs,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate,
)

SHIPPED = sorted(["demo", "tiny", "owt_small", "owt_medium", "owt_large", "cifar10", "imagenet32", "tiny_image",
                  "digits", "text_demo", "text_mdm", "text_prime2", "text_prime4", "text_genmd4", "text_ar"])
SUBTOKENS = {"text_mdm": 1, "text_genmd4": 1, "text_ar": 1, "text_prime4": 4}  # the others: l = 2


def with_(cfg: Config, **sections) -> Config:
    """Copy of cfg with e.g. model={"n_head": 3} replaced."""
    return replace(cfg, **{name: replace(getattr(cfg, name), **kw) for name, kw in sections.items()})


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return str(info.value)


# --- shipped configs ---------------------------------------------------------------------------------


def test_all_shipped_configs_are_present():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == SHIPPED
    assert available_configs() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_validates(name):
    cfg = load_config([f"config={name}"])
    validate(cfg)
    assert cfg.run.name == name
    assert cfg.prime.num_subtokens == SUBTOKENS.get(name, 2)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_has_a_comment_header(name):
    first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 10


def test_default_config_without_name():
    assert load_config([]) == Config()


def test_demo_runs_prime_with_invalid_codes_on_the_markov_source():
    cfg = load_config(["config=demo"])
    assert cfg.data.source == "markov" and cfg.prime.num_subtokens == 2
    b = resolve_base(cfg.data.vocab_size, cfg.prime.num_subtokens)
    assert b**cfg.prime.num_subtokens > cfg.data.vocab_size  # the demo exercises the invalid-code exclusion
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.data.markov_concentration, float)


def test_owt_small_values():
    cfg = load_config(["config=owt_small"])
    assert (cfg.data.source, cfg.data.path, cfg.data.vocab_size, cfg.data.seq_len) == ("shards", "data/owt", 50257, 1024)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head) == (12, 768, 12)
    t = cfg.train
    assert (t.batch_size, t.lr, t.min_lr, t.warmup_steps, t.steps) == (512, 3e-4, 3e-5, 2500, 1_000_000)
    assert (t.weight_decay, t.dtype, t.device, t.grad_clip, t.beta2) == (0.0, "bfloat16", "cuda", 1.0, 0.98)
    assert (t.eval_every, t.log_every) == (10000, 100)
    assert resolve_base(cfg.data.vocab_size, cfg.prime.num_subtokens) == 225


def test_base_inheritance():
    small = load_config(["config=owt_small"])
    large = load_config(["config=owt_large"])
    assert large.data.seq_len == 1024
    assert large.data == small.data
    assert (large.model.n_layer, large.model.d_model, large.model.n_head) == (16, 2048, 16)
    assert (large.train.lr, large.train.min_lr) == (2e-4, 2e-5)
    assert large.train.batch_size == small.train.batch_size == 512
    medium = load_config(["config=owt_medium"])
    assert (medium.model.n_layer, medium.model.d_model, medium.model.n_head) == (24, 1024, 16)
    assert medium.train == small.train

    cifar = load_config(["config=cifar10"])
    imnet = load_config(["config=imagenet32"])
    assert (imnet.data.path, imnet.data.seq_len, imnet.data.vocab_size) == ("data/imagenet32", 3072, 256)
    assert imnet.train == cifar.train
    assert (imnet.model.n_layer, imnet.model.d_model, imnet.model.n_head) == (24, 1024, 16)


def test_base_chain_and_relative_path(tmp_path):
    (tmp_path / "a.yaml").write_text("base: owt_large\ntrain:\n  steps: 7\n  warmup_steps: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nrun:\n  name: b\n")
    cfg = load_config([f"config={tmp_path / 'b.yaml'}"])
    assert (cfg.run.name, cfg.train.steps, cfg.model.d_model, cfg.data.seq_len) == ("b", 7, 2048, 1024)


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    assert "cycle" in error_of(load_config, [f"config={tmp_path / 'a.yaml'}"])


def test_unknown_base_name(tmp_path):
    (tmp_path / "a.yaml").write_text("base: owt_smal\n")
    msg = error_of(load_config, [f"config={tmp_path / 'a.yaml'}"])
    assert "owt_smal" in msg and "did you mean 'owt_small'" in msg


# --- overrides ---------------------------------------------------------------------------------------


def test_overrides_of_each_type_apply():
    cfg = load_config(
        [
            "config=demo",
            "train.steps=10",
            "train.warmup_steps=2",
            "prime.num_subtokens=3",
            "train.lr=0.01",
            "train.min_lr=1e-5",  # YAML 1.1 reads this as a string; float fields still take it
            "model.mlp_ratio=2",  # an int is a fine float
            "model.time_conditioning=true",
            "sample.float64=no",
            "run.name=123",  # str fields take the raw text
            "data.path=s3://bucket/a=b",  # only the first '=' splits
        ]
    )
    assert cfg.train.steps == 10 and cfg.prime.num_subtokens == 3
    assert cfg.train.lr == 0.01 and cfg.train.min_lr == 1e-5
    assert cfg.model.mlp_ratio == 2.0 and isinstance(cfg.model.mlp_ratio, float)
    assert cfg.model.time_conditioning is True and cfg.sample.float64 is False
    assert cfg.run.name == "123" and cfg.data.path == "s3://bucket/a=b"
    assert cfg.data.seq_len == 128  # untouched keys keep the config's value


@pytest.mark.parametrize(
    "word,value", [("true", True), ("false", False), ("yes", True), ("no", False), ("1", True), ("0", False), ("True", True)]
)
def test_bool_words(word, value):
    assert load_config([f"model.time_conditioning={word}"]).model.time_conditioning is value


def test_overrides_apply_in_order_and_after_the_file():
    cfg = load_config(["train.steps=5", "config=tiny", "train.steps=6", "train.steps=7"])
    assert cfg.train.steps == 7 and cfg.run.name == "tiny"


def test_config_accepts_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  n_layer: 3\n")
    assert load_config([f"config={path}"]).model.n_layer == 3


@pytest.mark.parametrize(
    "override,expected",
    [
        ("train.steps=ten", "train.steps expects int, got 'ten'"),
        ("train.steps=1.5", "train.steps expects int, got '1.5'"),
        ("train.steps=true", "train.steps expects int, got 'true'"),
        ("train.steps=", "train.steps expects int, got ''"),
        ("train.lr=fast", "train.lr expects float, got 'fast'"),
        ("train.lr=true", "train.lr expects float, got 'true'"),
        ("train.lr=.inf", "train.lr expects a finite float"),
        ("model.time_conditioning=maybe", "model.time_conditioning expects bool, got 'maybe'"),
        ("model.time_conditioning=2", "model.time_conditioning expects bool, got '2'"),
    ],
)
def test_wrong_override_types(override, expected):
    assert expected in error_of(load_config, [override])


@pytest.mark.parametrize(
    "override,suggestion",
    [
        ("model.n_layers=3", "model.n_layer"),
        ("trian.steps=3", "train.steps"),
        ("prime.num_subtoken=2", "prime.num_subtokens"),
        ("diffusion.schedul=cosine", "diffusion.schedule"),
    ],
)
def test_unknown_override_keys_name_the_closest(override, suggestion):
    key = override.split("=")[0]
    msg = error_of(load_config, [override])
    assert f"unknown config key '{key}'" in msg and f"did you mean '{suggestion}'?" in msg


def test_section_as_key_is_an_error():
    assert "is a section" in error_of(load_config, ["train=3"])


def test_unknown_config_name_lists_available_and_closest():
    msg = error_of(load_config, ["config=owt_smal"])
    assert "unknown config 'owt_smal'" in msg and "did you mean 'owt_small'" in msg
    for name in SHIPPED:
        assert name in msg


def test_missing_config_file(tmp_path):
    assert "does not exist" in error_of(load_config, [f"config={tmp_path / 'nope.yaml'}"])


@pytest.mark.parametrize("arg", ["train.steps", "--verbose", "=3"])
def test_malformed_override(arg):
    msg = error_of(load_config, [arg])
    assert "malformed override" in msg and "key=value" in msg


def test_config_given_twice():
    assert "once" in error_of(load_config, ["config=demo", "config=tiny"])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --- YAML file checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model:\n  n_layers: 3\n", "did you mean 'model.n_layer'?"),
        ("modle:\n  n_layer: 3\n", "did you mean 'model'?"),
        ("train:\n  steps: ten\n", "train.steps expects int, got 'ten'"),
        ("train:\n  steps: 1.0\n", "train.steps expects int, got 1.0"),
        ("train:\n  lr: yes\n", "train.lr expects float, got True"),
        ("run:\n  name: 12\n", "run.name expects str, got 12"),
        ("model:\n  time_conditioning: 3\n", "model.time_conditioning expects bool, got 3"),
        ("train: 5\n", "section 'train' must be a mapping"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("train: [\n", "not valid YAML"),
    ],
)
def test_yaml_files_are_checked_like_overrides(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    msg = error_of(load_config, [f"config={path}"])
    assert expected in msg and "bad.yaml" in msg


def test_yaml_bool_and_float_forms(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("model:\n  time_conditioning: 1\n  mlp_ratio: 3\ntrain:\n  lr: 1e-4\nsample:\n  float64: no\n")
    cfg = load_config([f"config={path}"])
    assert cfg.model.time_conditioning is True and cfg.sample.float64 is False
    assert cfg.model.mlp_ratio == 3.0 and cfg.train.lr == 1e-4


def test_empty_yaml_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config([f"config={path}"]) == Config()


# --- validate ------------------------------------------------------------------------------------------

BASE = Config()


@pytest.mark.parametrize(
    "sections,expected",
    [
        ({"data": {"vocab_size": 1}}, "data.vocab_size must be at least 2"),
        ({"prime": {"num_subtokens": 0}}, "prime.num_subtokens must be at least 1"),
        ({"prime": {"num_subtokens": 2, "base": 15}}, "fewer than vocab_size 256; use base >= 16"),
        ({"prime": {"base": 1}}, "prime.base must be at least 2"),
        ({"prime": {"base": -4}}, "prime.base must be at least 2"),
        ({"data": {"seq_len": 0}}, "data.seq_len must be at least 1"),
        ({"model": {"d_model": 250}}, "must be a positive multiple of model.n_head"),
        ({"model": {"d_model": 12, "n_head": 4}}, "head dim d_model / n_head = 3 is odd"),
        ({"model": {"n_head": 0}}, "model.n_head must be at least 1"),
        ({"model": {"n_layer": 0}}, "model.n_layer must be at least 1"),
        ({"data": {"source": "parquet"}}, "data.source must be one of markov, digits, shards"),
        ({"diffusion": {"schedule": "cos"}}, "linear, cosine, polynomial, loglinear, genmd4; got 'cos' (did you mean 'cosine'?)"),
        ({"diffusion": {"time_sampling": "sobol"}}, "diffusion.time_sampling must be one of antithetic, uniform"),
        ({"diffusion": {"eval_estimator": "mc"}}, "diffusion.eval_estimator must be one of count, continuous"),
        ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule must be one of cosine, constant"),
        ({"model": {"merge": "concat"}}, "model.merge must be one of sum, mlp"),
        ({"train": {"dtype": "float16"}}, "train.dtype must be one of float32, bfloat16"),
        ({"train": {"device": "mps"}}, "train.device must be one of auto, cpu, cuda"),
        ({"diffusion": {"schedule_power": 0.0}}, "diffusion.schedule_power must be positive"),
        ({"diffusion": {"schedule_power": -1.0}}, "diffusion.schedule_power must be positive"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be at least 1"),
        ({"eval": {"batch_size": -1}}, "eval.batch_size must be non-negative"),
        ({"train": {"steps": 0}}, "train.steps must be at least 1"),
        ({"sample": {"steps": 0}}, "sample.steps must be at least 1"),
        ({"train": {"warmup_steps": -1}}, "train.warmup_steps must be non-negative"),
        ({"train": {"lr": 0.0}}, "train.lr must be positive"),
        ({"train": {"lr": -1e-3}}, "train.lr must be positive"),
        ({"sample": {"prompt_len": 128}}, "sample.prompt_len must be in [0, data.seq_len)"),
        ({"sample": {"prompt_len": -1}}, "sample.prompt_len must be in [0, data.seq_len)"),
        ({"eval": {"repeats": 0}}, "eval.repeats must be at least 1"),
        ({"train": {"steps": "10"}}, "train.steps expects int, got '10'"),
    ],
)
def test_validate_rules(sections, expected):
    cfg = with_(BASE, **sections)
    assert expected in error_of(validate, cfg)
    # The same rule fires through every entry point.
    d = config_to_dict(cfg)
    assert expected in error_of(config_from_dict, d)
    if "expects" not in expected:  # a wrongly typed value cannot be written as an override
        overrides = [f"{s}.{k}={v}" for s, kw in sections.items() for k, v in kw.items()]
        assert expected in error_of(load_config, overrides)


def test_schedule_eps_explains_why():
    msg = error_of(validate, with_(BASE, diffusion={"schedule": "loglinear", "schedule_eps": 1e-3}))
    assert "diffusion.schedule_eps must be 0" in msg
    assert "alpha(1) = eps > 0" in msg and "never masked" in msg and "NELBO" in msg


def test_validate_reports_every_problem_at_once():
    msg = error_of(validate, with_(BASE, train={"steps": 0, "lr": 0.0}))
    assert "2 config problems" in msg and "train.steps" in msg and "train.lr" in msg


def test_validate_accepts_valid_edges():
    validate(with_(BASE, data={"vocab_size": 2, "seq_len": 1}, train={"warmup_steps": 0}))
    validate(with_(BASE, prime={"num_subtokens": 2, "base": 16}))  # exactly 16 ** 2 == 256
    validate(with_(BASE, sample={"prompt_len": 127}))
    for schedule in ("linear", "cosine", "polynomial", "loglinear"):
        validate(with_(BASE, diffusion={"schedule": schedule}))


EVERY_FIELDS = ["train.log_every", "train.eval_every", "ckpt.every_steps", "ckpt.every_minutes", "ckpt.keep_every",
                "sample.every_steps"]


def test_the_every_fields_are_the_ones_the_rule_covers():
    from prime_scale.config.rules import every_fields

    assert sorted(every_fields()) == sorted(EVERY_FIELDS)  # a new *_every* field joins the rule by its name


@pytest.mark.parametrize("key", EVERY_FIELDS)
def test_every_field_zero_means_never_and_loads(key):
    cfg = load_config(["config=tiny", f"{key}=0"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == 0
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("key", EVERY_FIELDS)
def test_every_field_negative_is_refused_through_every_entry_point(key):
    expected = f"{key} must be non-negative (0 = never), got -1"
    assert expected in error_of(load_config, ["config=tiny", f"{key}=-1"])
    section, name = key.split(".")
    assert expected in error_of(validate, with_(BASE, **{section: {name: -1}}))
    assert expected in error_of(config_from_dict, {section: {name: -1}})


def test_min_lr_above_lr_is_refused_with_the_fields_values_and_a_fix():
    msg = error_of(load_config, ["config=tiny", "train.lr=1e-4", "train.min_lr=1e-3"])
    assert "train.min_lr=0.001 is above train.lr=0.0001" in msg
    assert "instead of decaying" in msg and "set train.min_lr <= 0.0001 (e.g. train.min_lr=1e-05)" in msg
    assert "train.lr_schedule=constant" in msg
    assert "config problems" not in msg  # one problem, one message


def test_warmup_longer_than_the_run_is_refused_with_the_fields_and_a_fix():
    msg = error_of(load_config, ["config=demo", "train.steps=10"])  # demo warms up over 50 steps
    assert msg == ("train.warmup_steps=50 is more than train.steps=10: the run would end before the learning rate "
                   "reaches train.lr; set train.warmup_steps <= 10 (e.g. train.warmup_steps=1)")
    assert load_config(["config=demo", "train.steps=50"]).train.warmup_steps == 50  # the edge: it peaks at the end
    assert load_config(["config=demo", "train.steps=10"], check_schedule=False).train.warmup_steps == 50
    both = error_of(load_config, ["config=demo", "train.steps=10", "train.lr=1e-4", "train.min_lr=1e-3"])
    assert both.startswith("2 config problems") and "train.min_lr" in both and "train.warmup_steps=50" in both


def test_min_lr_edges_and_the_constant_schedule_load():
    assert load_config(["config=tiny", "train.lr=1e-3", "train.min_lr=1e-3"]).train.min_lr == 1e-3  # flat decay
    assert load_config(["config=tiny", "train.min_lr=0"]).train.min_lr == 0.0
    # constant: min_lr is never used, so it contradicts nothing
    cfg = load_config(["config=tiny", "train.lr_schedule=constant", "train.lr=1e-5", "train.min_lr=1e-4"])
    assert cfg.train.lr_schedule == "constant"


def test_a_saved_config_with_a_rising_schedule_still_loads_from_its_dict():
    """The schedule check is load_config's, for a run about to start: an exported model's saved config whose
    schedule rose still loads (its weights do not depend on it any more)."""
    d = config_to_dict(Config())
    d["train"].update(lr=1e-4, min_lr=1e-3)
    cfg = config_from_dict(d)
    assert (cfg.train.lr, cfg.train.min_lr) == (1e-4, 1e-3)
    validate(cfg)


def test_negative_min_lr_is_refused_everywhere():
    expected = "train.min_lr must be non-negative, got -1e-05"
    assert expected in error_of(load_config, ["train.min_lr=-1e-5"])
    assert expected in error_of(validate, with_(BASE, train={"min_lr": -1e-5}))


def test_a_bad_lr_gives_one_message_not_a_schedule_one_too():
    msg = error_of(load_config, ["train.lr=0", "train.min_lr=1e-4"])
    assert msg == "train.lr must be positive, got 0.0"


# --- dict / file round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_save_load_round_trip(tmp_path, name):
    conditioned = "no" if name == "text_ar" else "yes"  # an AR model has no masking rate to condition on
    cfg = load_config([f"config={name}", "train.lr=1e-10", "train.min_lr=1e-11", "run.name=007",
                       f"model.time_conditioning={conditioned}"])
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config([f"config={path}"]) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg


def test_dict_round_trip():
    cfg = load_config(["config=owt_large"])
    d = config_to_dict(cfg)
    assert d["model"]["d_model"] == 2048 and d["data"]["seq_len"] == 1024
    assert config_from_dict(d) == cfg
    assert config_from_dict({}) == Config()
    assert config_from_dict({"train": {"steps": 3}}).train.steps == 3


def test_config_from_dict_checks_keys_and_types():
    assert "did you mean 'train.steps'?" in error_of(config_from_dict, {"train": {"step": 3}})
    assert "train.steps expects int" in error_of(config_from_dict, {"train": {"steps": "3"}})
