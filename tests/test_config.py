"""The training config: schema, loading (base / --set / migrations), one-line errors, docs, GUI introspection."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from tuneonce.config import CONFIG_VERSION, ConfigError, TrainConfig, dump_config, load_config, validate_dict
from tuneonce.config.docs import render_schema_markdown
from tuneonce.config.introspect import all_field_paths, describe_schema
from tuneonce.config.loading import deep_merge, resolve_config_dict
from tuneonce.config.migrations import MigrationError, migrate
from tuneonce.config.schema import CONSTRUCTOR_KEYS, OptimizerConfig

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "training_presets").glob("*.yaml"))
DEMO_PRESET = ROOT / "training_presets" / "demo_sdxl_lora.yaml"
EXAMPLES = sorted((ROOT / "configs" / "examples").glob("*.yaml"))

MINIMAL = """\
model: {family: sdxl, base_model: some/model}
data: {folders: [{path: imgs}], resolution: 64, bucketing: false}
schedule: {max_steps: 10}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    text = str(info.value)
    assert "\n" not in text, "config errors are one line"
    return text


# --------------------------------------------------------------------------- presets and examples


def test_required_presets_exist():
    names = {p.name for p in PRESETS}
    assert {"demo_sdxl_lora.yaml", "sd15_lora.yaml", "sdxl_lora.yaml", "sd15_finetune.yaml",
            "sdxl_finetune.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS + EXAMPLES, ids=lambda p: p.name)
def test_every_preset_and_example_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert cfg.config_version == CONFIG_VERSION
    # The resolved YAML (what --dry-run prints and the GUI saves) loads back to the same config.
    again = write(tmp_path, "resolved.yaml", dump_config(cfg))
    assert load_config(again) == cfg
    minimal = write(tmp_path, "minimal.yaml", dump_config(cfg, exclude_defaults=True))
    assert load_config(minimal) == cfg


def test_real_model_presets_use_the_transfer_recipe():
    names = [p.stem for p in PRESETS if not p.stem.startswith("demo")] + ["demo_sdxl_lora"]
    assert {"zimage_finetune", "qwen_image_finetune", "flux_dev_lora"} <= set(names)
    for name in names:
        cfg = load_config(ROOT / "training_presets" / f"{name}.yaml")
        assert cfg.optimizer.type == "muon_adv"
        # the demo's 200 tiny steps use its base's swept best LR (docs/lr_transfer.md); real models the default
        assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (8e-3 if name.startswith("demo") else 1e-3, 0.1)
        assert cfg.optimizer.spectral_scaling and cfg.optimizer.depth_scaled_eps
        if cfg.method == "lora":
            assert cfg.lora.effective_alpha == cfg.lora.rank
    demo = load_config(ROOT / "training_presets" / "demo_sdxl_lora.yaml")
    assert demo.model.base_model == "workspace/demo/tiny_sdxl_base"


# --------------------------------------------------------------------------- base: and --set


def test_base_files_merge_recursively_relative_to_the_file(tmp_path):
    write(tmp_path, "presets/root.yaml", MINIMAL + "optimizer: {type: adamuon_adv, lr: 0.002}\nlora: {rank: 4}\n")
    write(tmp_path, "presets/mid.yaml", """\
        base: root.yaml
        optimizer: {weight_decay: 0.05}
        data: {folders: [{path: a}, {path: b, repeats: 3}]}
        """)
    child = write(tmp_path, "runs/child.yaml", """\
        base: ../presets/mid.yaml
        optimizer: {lr: 0.003}
        """)
    cfg = load_config(child)
    assert cfg.optimizer.type == "adamuon_adv"  # from root, untouched by the children
    assert cfg.optimizer.lr == 0.003  # child wins
    assert cfg.optimizer.weight_decay == 0.05  # from mid
    assert cfg.lora.rank == 4
    assert [(f.path, f.repeats) for f in cfg.data.folders] == [("a", 1), ("b", 3)]  # lists replace
    assert cfg.data.resolution == 64  # sibling keys of a replaced list survive


def test_several_bases_apply_in_order(tmp_path):
    write(tmp_path, "a.yaml", MINIMAL + "lora: {rank: 4, dropout: 0.1}\n")
    write(tmp_path, "b.yaml", "lora: {rank: 8}\n")
    cfg = load_config(write(tmp_path, "c.yaml", "base: [a.yaml, b.yaml]\n"))
    assert (cfg.lora.rank, cfg.lora.dropout) == (8, 0.1)


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": [1]}}
    out = deep_merge(base, {"a": {"b": 2}})
    assert out == {"a": {"b": 2, "c": [1]}} and base == {"a": {"b": 1, "c": [1]}}


def test_base_cycle_and_missing_base_are_errors(tmp_path):
    write(tmp_path, "x.yaml", "base: y.yaml\n")
    y = write(tmp_path, "y.yaml", "base: x.yaml\n")
    assert "cycle" in error_of(y) and "base" in error_of(y)
    missing = write(tmp_path, "m.yaml", "base: nope.yaml\n")
    msg = error_of(missing)
    assert "m.yaml" in msg and "nope.yaml" in msg


def test_overrides_are_yaml_typed(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL)
    cfg = load_config(path, [
        "optimizer.lr=2e-3",
        "optimizer.nesterov=false",
        "lora.alpha=8",
        "data.folders.0.repeats=3",
        "sampling.prompts=[{prompt: a zxq star, seed: 3}]",
        "sampling.every_n_steps=5",
        "model.depth={unet: 12}",
        "training.max_grad_norm=",
    ])
    assert cfg.optimizer.lr == 2e-3 and cfg.optimizer.nesterov is False
    assert cfg.lora.alpha == 8.0 and cfg.data.folders[0].repeats == 3
    assert cfg.sampling.prompts[0].prompt == "a zxq star" and cfg.sampling.prompts[0].seed == 3
    assert cfg.model.depth == {"unet": 12}
    assert cfg.training.max_grad_norm is None


@pytest.mark.parametrize("override, expected", [
    ("optimizer.lr", "KEY=VALUE"),
    ("data.folders.5.path=x", "data.folders.5"),
    ("model.family.x=1", "'model.family' is a value"),
])
def test_bad_overrides_name_the_problem(tmp_path, override, expected):
    msg = error_of(write(tmp_path, "c.yaml", MINIMAL), (override,))
    assert msg.startswith("--set") and expected in msg


# --------------------------------------------------------------------------- one-line errors


def test_unknown_key_names_file_key_and_closest(tmp_path):
    path = write(tmp_path, "c.yaml", MINIMAL + "optimizer: {learnig_rate: 1}\nlora: {rnk: 4}\n")
    msg = error_of(path)
    assert msg.startswith(str(path))
    assert "optimizer.learnig_rate" in msg or "lora.rnk" in msg
    assert "more problem" in msg
    msg = error_of(write(tmp_path, "d.yaml", MINIMAL + "lora: {rnk: 4}\n"))
    assert "lora.rnk: unknown key (did you mean 'lora.rank'?)" in msg


def test_unknown_key_in_the_wrong_section_points_to_the_right_one(tmp_path):
    msg = error_of(write(tmp_path, "c.yaml", MINIMAL), ("training.lr=3",))
    assert msg == "--set: training.lr: unknown key (did you mean 'optimizer.lr'?)"
    path = write(tmp_path, "d.yaml", MINIMAL + "optimzer: {lr: 1}\n")
    assert error_of(path) == f"{path}: optimzer: unknown key (did you mean 'optimizer'?)"


def test_error_names_the_base_file_that_set_the_key(tmp_path):
    base = write(tmp_path, "base.yaml", MINIMAL + "lora: {dropout: 2}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nlora: {rank: 4}\n")
    msg = error_of(child)
    assert msg.startswith(f"{base}: lora.dropout:") and "2" in msg


@pytest.mark.parametrize("override, key, fragment", [
    ("optimizer.lr=-1", "optimizer.lr", "greater than or equal to 0"),
    ("lora.rank=abc", "lora.rank", "'abc'"),
    ("optimizer.type=muon", "optimizer.type", "did you mean 'muon_adv'"),
    ("optimizer.orthogonalizer=polar", "optimizer.orthogonalizer", "did you mean 'polar_express'"),
    ("optimizer.adam_betas=[0.9, 1.5]", "optimizer.adam_betas.1", "less than 1"),
    ("model.depth={unet: 0}", "model.depth.unet", "greater than or equal to 1"),
    ("lora.targets=[1]", "lora.targets.0", "valid string"),
    ("saving.name=a/b", "saving.name", "pattern"),
    ("data.folders=[]", "data.folders", "at least 1"),
    ("model.family=flux2", "model.family", "Input should be"),
])
def test_bad_values_name_the_dotted_key(tmp_path, override, key, fragment):
    msg = error_of(write(tmp_path, "c.yaml", MINIMAL), (override,))
    assert msg.startswith(f"--set: {key}: ") and fragment in msg
    assert "more problem" not in msg  # union members are folded into one problem


def test_missing_required_key(tmp_path):
    msg = error_of(write(tmp_path, "c.yaml", "model: {family: sd15}\ndata: {folders: [{path: x}]}\n"
                                             "schedule: {max_steps: 3}\n"))
    assert "model.base_model: required key is missing" in msg


def test_yaml_syntax_errors_and_duplicate_keys(tmp_path):
    msg = error_of(write(tmp_path, "bad.yaml", "model: {family: sdxl\n"))
    assert "bad.yaml:" in msg and "invalid YAML" in msg
    msg = error_of(write(tmp_path, "dup.yaml", MINIMAL + "lora: {rank: 4}\nlora: {rank: 8}\n"))
    assert "duplicate key 'lora'" in msg
    msg = error_of(write(tmp_path, "list.yaml", "- a\n- b\n"))
    assert "mapping" in msg
    assert "file not found" in error_of(tmp_path / "absent.yaml")


# --------------------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize("overrides, key", [
    (("lora.dora=true",), "lora.dora"),
    (("method=finetune", "optimizer.type=lora_muon"), "optimizer.type"),
    (("model.family=sd15", "lora.train_text_encoders.text_encoder_2=true", "data.cache_text_embeddings=false"),
     "lora.train_text_encoders.text_encoder_2"),
    (("lora.train_text_encoders.text_encoder=true",), "data.cache_text_embeddings"),
    (("data.shuffle_tags=true",), "data.cache_text_embeddings"),
    (("data.random_crop=true",), "data.random_crop"),
    (("schedule.epochs=2",), "schedule.epochs"),
    (("schedule.max_steps=null",), "schedule.max_steps"),
    (("schedule.warmup_steps=11",), "schedule.warmup_steps"),
    (("sampling.every_n_steps=5",), "sampling.prompts"),
    (("validation.every_n_steps=5",), "validation.folder"),
    (("validation.folder=v", "validation.split_fraction=0.1"), "validation.split_fraction"),
    (("lora.init_lora=old.ckpt",), "lora.init_lora"),
    (("data.resolution=100",), "data.resolution"),
    (("optimizer.type=prodigy", "optimizer.lr=1", "optimizer.text_encoder_lr.text_encoder=0.5"),
     "optimizer.text_encoder_lr.text_encoder"),
])
def test_cross_field_rules(tmp_path, overrides, key):
    path = write(tmp_path, "c.yaml", MINIMAL)
    msg = error_of(path, overrides)
    # Blamed on whoever set the named key (or its section): here --set or the file.
    assert msg.startswith((f"--set: {key}: ", f"{path}: {key}: "))


@pytest.mark.parametrize("overrides", [
    ("lora.dora=true", "lora.force_dora_with_spectral=true"),
    ("lora.dora=true", "optimizer.spectral_scaling=false"),
    ("lora.dora=true", "optimizer.type=adamw"),
    ("optimizer.type=lora_muon",),
    ("model.family=sd15", "lora.train_text_encoders.text_encoder=true", "data.cache_text_embeddings=false"),
    ("schedule.epochs=2", "schedule.max_steps=null"),
    ("optimizer.type=prodigy", "optimizer.lr=1", "optimizer.text_encoder_lr.text_encoder=0"),
])
def test_allowed_combinations(tmp_path, overrides):
    load_config(write(tmp_path, "c.yaml", MINIMAL), overrides)


def test_validate_dict_lists_every_problem():
    good = yaml.safe_load(MINIMAL)
    assert validate_dict(good) == []
    bad = deep_merge(good, {"lora": {"dora": True}, "schedule": {"epochs": 3}})
    assert [k for k, _ in validate_dict(bad)] == ["lora.dora", "schedule.epochs"]
    typo = deep_merge(good, {"optimizer": {"lrr": 1, "beta1": 2}})
    assert sorted(k for k, _ in validate_dict(typo)) == ["optimizer.beta1", "optimizer.lrr"]
    assert validate_dict({**good, "config_version": 99})[0][0] == "config_version"


# --------------------------------------------------------------------------- migrations

V1 = """\
config_version: 1
model: {family: sd15, base_model: m}
optimizer: {name: adamuon_adv, learning_rate: 0.002}
training: {lr_scheduler: cosine, lr_warmup_steps: 5, max_steps: 40, batch_size: 2}
data: {folders: [imgs, {path: more, repeats: 2}], resolution: 512}
"""


def test_v1_to_v2_migration_step():
    migrated = migrate(yaml.safe_load(V1))
    assert migrated["config_version"] == CONFIG_VERSION == 2
    assert migrated["optimizer"] == {"type": "adamuon_adv", "lr": 0.002}
    assert migrated["schedule"] == {"scheduler": "cosine", "warmup_steps": 5, "max_steps": 40}
    assert migrated["training"] == {"batch_size": 2}
    assert migrated["data"]["folders"] == [{"path": "imgs"}, {"path": "more", "repeats": 2}]


def test_old_base_file_loads_under_a_new_child(tmp_path):
    write(tmp_path, "old.yaml", V1)
    child = write(tmp_path, "new.yaml", "base: old.yaml\nconfig_version: 2\noptimizer: {weight_decay: 0.2}\n")
    cfg = load_config(child)
    assert (cfg.optimizer.type, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamuon_adv", 0.002, 0.2)
    assert (cfg.schedule.scheduler, cfg.schedule.max_steps, cfg.training.batch_size) == ("cosine", 40, 2)


def test_migration_errors():
    with pytest.raises(MigrationError, match="newer"):
        migrate({"config_version": CONFIG_VERSION + 1})
    with pytest.raises(MigrationError, match="both set"):
        migrate({"config_version": 1, "optimizer": {"name": "adamw", "type": "adamw"}})
    with pytest.raises(MigrationError, match="integer"):
        migrate({"config_version": "two"})


# --------------------------------------------------------------------------- optimizer keywords


def test_optimizer_section_mirrors_the_constructors():
    """Each config key reaches the constructor, and the config's default is the default the optimizer takes."""
    optim = pytest.importorskip("tuneonce.optimizer")
    torch = pytest.importorskip("torch")
    classes = {"muon_adv": "Muon_adv", "adamuon_adv": "AdaMuon_adv", "lora_muon": "LoRAMuon"}
    for kind, cls_name in classes.items():
        cls = getattr(optim, cls_name)
        kwargs = OptimizerConfig(type=kind).constructor_kwargs()
        assert set(kwargs) == set(CONSTRUCTOR_KEYS[kind])
        defaults = cls([torch.nn.Parameter(torch.zeros(4, 6))]).defaults  # the keywords the optimizer took
        for key, value in kwargs.items():
            assert key in defaults, f"{cls_name} has no keyword {key}"
            assert value == defaults[key], f"{cls_name}.{key}: config default {value!r} != {defaults[key]!r}"


# --------------------------------------------------------------------------- docs and GUI introspection


def test_committed_schema_doc_is_fresh():
    committed = (ROOT / "configs" / "SCHEMA.md").read_text(encoding="utf-8")
    assert committed == render_schema_markdown(), "run: python scripts/gen_config_docs.py"


def test_describe_schema_covers_every_field_with_a_description():
    sections = describe_schema()
    assert set(sections) == {"general", *(k for k, v in TrainConfig.model_fields.items()
                                           if k not in ("config_version", "method", "resume"))}
    fields = {f["key"]: f for entries in sections.values() for f in entries}
    assert set(fields) == set(all_field_paths())
    for entries in sections.values():
        for f in entries + [i for e in entries for i in e.get("item_fields", [])]:
            assert f["description"], f"{f['key']} has no description"
    assert fields["optimizer.lora_a_optimizer"]["choices"] == ["muon", "adam", "signsgd"]
    assert fields["optimizer.lora_a_optimizer"]["default"] == "muon"
    assert fields["lora.rank"]["constraints"] == {"ge": 1, "le": 4096}
    assert fields["model.family"]["required"] and fields["model.depth"]["nullable"]
    assert [i["key"] for i in fields["data.folders"]["item_fields"]][:3] == ["path", "repeats", "default_caption"]
    concept = {i["key"]: i for i in fields["data.folders"]["item_fields"]}  # a concept's own settings in the GUI
    assert concept["role"]["choices"] == ["train", "regularization"] and concept["loss_weight"]["default"] == 1.0
    assert concept["caption_dropout"]["nullable"] and concept["prior_prediction"]["default"] is False
    # Defaults reported for the GUI are what an empty section really validates to.
    for section, entries in sections.items():
        info = TrainConfig.model_fields.get(section)
        if info is None or info.default_factory is None:
            continue
        actual = info.default_factory().model_dump(mode="json")
        for f in entries:
            node = actual
            for part in f["key"].split(".")[1:]:
                node = node[part]
            assert node == f["default"], f["key"]


def test_fragments_merge_onto_a_preset(tmp_path):
    for fragment in sorted((ROOT / "configs" / "fragments").glob("*.yaml")):
        combined = write(tmp_path, f"with_{fragment.name}", f"base: [{DEMO_PRESET}, {fragment}]\n")
        cfg = load_config(combined)
        for key, value in yaml.safe_load(fragment.read_text()).items():
            assert cfg.model_dump(mode="json")[key] | value == cfg.model_dump(mode="json")[key], fragment.name


def test_resolve_config_dict_records_where_keys_came_from(tmp_path):
    base = write(tmp_path, "b.yaml", MINIMAL)
    child = write(tmp_path, "c.yaml", "base: b.yaml\nlora: {rank: 2}\n")
    merged, origin = resolve_config_dict(child, ["optimizer.lr=0.01"])
    assert merged["lora"]["rank"] == 2 and merged["optimizer"]["lr"] == 0.01
    assert origin["lora.rank"] == str(child) and origin["model.family"] == str(base)
    assert origin["optimizer.lr"] == "--set"
