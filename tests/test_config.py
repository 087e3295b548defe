"""Registry and YAML composition: presets, overrides, provenance and every error path."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from arlab import config as C
from arlab import registry, rundir
from arlab.errors import ConfigError

# ----------------------------------------------------------------------------- a sandbox kind


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """Registers kinds 'tkind' (with a nested 'tsub' slot) and 'tsub'; presets under tmp_path."""
    monkeypatch.setenv("ARLAB_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    saved = {k: dict(v) for k, v in registry._REGISTRY.items()}

    @registry.register("tsub", "small")
    class Small:
        """A sub-component."""

        @dataclass
        class Config:
            width: int = 4  # channels
            act: str = "silu"

            def __post_init__(self):
                if self.act not in ("silu", "relu"):
                    raise ConfigError(f"act {self.act!r} is not one of silu, relu")

        def __init__(self, cfg):
            self.cfg = cfg

    @registry.register("tsub", "big")
    class Big:
        """Another sub-component."""

        @dataclass
        class Config:
            width: int = 64
            depth: int = 2

        def __init__(self, cfg):
            self.cfg = cfg

    @registry.register("tkind", "outer")
    class Outer:
        """A component with a nested slot."""

        @dataclass
        class Config:
            size: int = 32  # image size
            rate: float = 0.1
            levels: list[int] = field(default_factory=lambda: [8, 5])
            sub: Any = registry.slot("tsub", default="small")
            divisor: int = 4

            def check(self, exp):
                if exp.has("tother") and exp.config("tother").n % self.divisor:
                    raise ConfigError(f"tother.n={exp.config('tother').n} is not divisible by "
                                      f"tkind.divisor={self.divisor}")

        def __init__(self, cfg, extra=None):
            self.cfg, self.extra = cfg, extra

    @registry.register("tother", "plain")
    class Plain:
        """A third kind for cross-slot checks."""

        @dataclass
        class Config:
            n: int = 8

        def __init__(self, cfg):
            self.cfg = cfg

    def write(rel: str, text: str) -> Path:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
        return p

    write("registry/tkind/base-preset.yaml", """\
        # a preset
        type: outer
        size: 64
        sub: {preset: wide, width: 16}
        """)
    write("registry/tkind/child.yaml", """\
        preset: base-preset
        rate: 0.5
        """)
    write("registry/tsub/wide.yaml", "type: big\nwidth: 128\n")
    write("experiments/g/exp.yaml", """\
        description: test
        tkind: child
        trainer: {max_steps: 10}
        """)
    yield write
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def test_preset_chain_and_provenance(lab):
    exp = C.load_experiment("g/exp")
    node = exp.tree["tkind"]
    assert node["type"] == "outer" and node["size"] == 64 and node["rate"] == 0.5
    assert node["sub"] == {"type": "big", "width": 16, "depth": 2}
    assert node["levels"] == [8, 5] and node["divisor"] == 4  # defaults made explicit
    assert exp.provenance["tkind.size"] == "registry/tkind/base-preset.yaml"
    assert exp.provenance["tkind.rate"] == "registry/tkind/child.yaml"
    assert exp.provenance["tkind.sub.width"] == "registry/tkind/base-preset.yaml"
    assert exp.provenance["trainer.max_steps"] == "experiments/g/exp.yaml"
    assert exp.name == "g/exp" and exp.trainer.max_steps == 10
    cfg = exp.config("tkind")
    assert isinstance(cfg, registry.get("tkind", "outer").config) and cfg.size == 64
    obj = exp.build("tkind", extra=3)
    assert obj.cfg.rate == 0.5 and obj.extra == 3


def test_dotlist_overrides_edit_and_replace(lab):
    exp = C.load_experiment("g/exp", ["tkind.size=16", "tkind.levels=[4,4,4]", "tkind.sub.width=7"])
    assert exp.tree["tkind"]["size"] == 16 and exp.tree["tkind"]["levels"] == [4, 4, 4]
    assert exp.tree["tkind"]["sub"]["width"] == 7 and exp.tree["tkind"]["sub"]["type"] == "big"
    assert exp.provenance["tkind.size"] == C.CMDLINE
    # a name replaces the whole node: no key of the old preset survives
    exp = C.load_experiment("g/exp", ["tkind=outer"])
    assert exp.tree["tkind"]["size"] == 32 and exp.tree["tkind"]["rate"] == 0.1
    assert exp.tree["tkind"]["sub"] == {"type": "small", "width": 4, "act": "silu"}
    exp = C.load_experiment("g/exp", ["tkind.sub=small", "tkind.sub.width=2"])
    assert exp.tree["tkind"]["sub"] == {"type": "small", "width": 2, "act": "silu"}
    exp = C.load_experiment("g/exp", ["tkind.type=outer"])  # 'type' also replaces the node
    assert exp.tree["tkind"]["size"] == 32
    exp = C.load_experiment("g/exp", ["tkind.rate=1"])  # int coerced to the float field
    assert exp.config("tkind").rate == 1.0 and isinstance(exp.config("tkind").rate, float)


def test_base_files_merge_left_to_right(lab):
    lab("experiments/_base/one.yaml", "tkind: {preset: base-preset, rate: 0.2}\nrun: {seed: 5}\n")
    lab("experiments/_base/two.yaml", "tkind: {size: 128}\n")
    lab("experiments/g/based.yaml", "base: [../_base/one.yaml, ../_base/two.yaml]\ntkind: {rate: 0.3}\n")
    exp = C.load_experiment("g/based")
    assert exp.tree["tkind"]["size"] == 128 and exp.tree["tkind"]["rate"] == 0.3
    assert exp.run.seed == 5
    assert exp.provenance["tkind.size"] == "experiments/_base/two.yaml"
    assert "_base/one" not in C.experiments()  # underscore folders are not experiments


def test_interpolation_resolves_over_explicit_defaults(lab):
    lab("experiments/g/interp.yaml", "tkind: {preset: child, size: '${tother.n}'}\ntother: plain\n")
    exp = C.load_experiment("g/interp")
    assert exp.tree["tkind"]["size"] == 8  # tother.n is a default, made explicit before resolving


def test_cross_slot_check(lab):
    lab("experiments/g/cross.yaml", "tkind: child\ntother: {type: plain, n: 6}\n")
    with pytest.raises(ConfigError, match=r"tother.n=6 is not divisible by tkind.divisor=4"):
        C.load_experiment("g/cross")
    assert C.load_experiment("g/cross", ["tother.n=12"]).config("tother").n == 12


@pytest.mark.parametrize("overrides,pattern", [
    (["tkind.sizee=3"], r"tkind\.sizee: unknown parameter of tkind/outer \(command line\)\. "
                        r"Did you mean 'size'\? Valid parameters: divisor, levels, rate, size, sub"),
    (["tkind.sub.widht=3"], r"tkind\.sub\.widht: unknown parameter of tsub/big \(command line\)\. "
                            r"Did you mean 'width'\?"),
    (["tkind=chlid"], r"tkind: unknown tkind 'chlid' \(command line\)\. Did you mean 'child'\? "
                      r"Valid tkind presets: base-preset, child; components: outer"),
    (["tkind.sub=smal"], r"unknown tsub 'smal'.*Did you mean 'small'"),
    (["tkind.size=abc"], r"tkind\.size: 'abc' is not a valid int \(command line\)"),
    (["tkind.sub=small", "tkind.sub.act=gelu"], r"act 'gelu' is not one of silu, relu \(command line\)"),
    (["trainr.max_steps=3"], r"unknown top-level key 'trainr' \(command line\)\. Did you mean 'trainer'\?"),
    (["trainer.max_step=3"], r"trainer\.max_step: unknown parameter.*Did you mean 'max_steps'"),
    (["trainer.precision=fp8"], r"trainer\.precision 'fp8' is not one of"),
    (["tkind"], r"override 'tkind' is not KEY=VALUE"),
    (["tother.n=3"], r"tother: overrides n given \(command line\) but no tother was chosen"),
])
def test_errors_name_key_source_and_choices(lab, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        C.load_experiment("g/exp", overrides)


def test_errors_in_files_name_the_file(lab):
    lab("registry/tkind/typo.yaml", "type: outer\nsiez: 3\n")
    with pytest.raises(ConfigError, match=r"tkind\.siez: unknown parameter of tkind/outer "
                                          r"\(registry/tkind/typo\.yaml\)\. Did you mean 'size'\?"):
        C.load_experiment("g/exp", ["tkind=typo"])
    lab("registry/tkind/notype.yaml", "size: 3\n")
    with pytest.raises(ConfigError, match=r"notype\.yaml: a tkind preset needs 'type:'"):
        C.load_experiment("g/exp", ["tkind=notype"])
    lab("registry/tkind/badtype.yaml", "type: outr\n")
    with pytest.raises(ConfigError, match=r"tkind 'outr' is not registered \(tkind\.type, "
                                          r"registry/tkind/badtype\.yaml\)\. Did you mean 'outer'\?"):
        C.load_experiment("g/exp", ["tkind=badtype"])
    lab("experiments/g/broken.yaml", "tkind: [unclosed\n")
    with pytest.raises(ConfigError, match=r"experiments/g/broken\.yaml is not valid YAML"):
        C.load_experiment("g/broken")
    lab("experiments/g/cyc.yaml", "base: [cyc.yaml]\n")
    with pytest.raises(ConfigError, match="base cycle"):
        C.load_experiment("g/cyc")
    lab("registry/tkind/loop.yaml", "preset: loop\n")
    with pytest.raises(ConfigError, match="preset cycle"):
        C.load_experiment("g/exp", ["tkind=loop"])
    with pytest.raises(ConfigError, match=r"experiment 'g/exq' not found.*Did you mean 'g/exp'\?"):
        C.load_experiment("g/exq")
    lab("experiments/g/badref.yaml", "tkind: {preset: child, size: '${nothere.x}'}\n")
    with pytest.raises(ConfigError, match=r"tkind.size: interpolation failed \(experiments/g/badref.yaml\)"):
        C.load_experiment("g/badref")


def test_run_dir_config_reproduces_the_experiment(lab, tmp_path):
    exp = C.load_experiment("g/exp", ["tkind.size=16", "run.dir=" + str(tmp_path / "run1")])
    d = rundir.run_dir(exp)
    saved = d / "config.yaml"
    assert saved.exists()
    again = C.load_experiment(str(saved))
    assert again.tree == exp.tree and again.name == "g/exp"
    assert yaml.safe_load(saved.read_text())["tkind"]["sub"]["type"] == "big"


def test_default_run_dir_is_under_runs(lab):
    exp = C.load_experiment("g/exp")
    d = rundir.run_dir(exp)
    assert d.parts[:3] == ("runs", "g", "exp") and (d / "config.yaml").exists()


def test_metrics_are_flat_numbers(tmp_path):
    import torch

    path = rundir.write_metrics(tmp_path, {"val": {"psnr": torch.tensor(28.5), "ok": True},
                                      "loss": 0.25, "name": "x", "nan": float("nan")})
    assert json.loads(path.read_text()) == {"loss": 0.25, "val/ok": 1, "val/psnr": 28.5}


def test_registry_rejects_duplicates_and_missing_config(lab):
    with pytest.raises(ConfigError, match="registered twice"):
        @registry.register("tsub", "small")
        class Other:
            @dataclass
            class Config:
                pass

    with pytest.raises(TypeError, match="must define a @dataclass 'Config'"):
        @registry.register("tsub", "noconfig")
        class NoConfig:
            pass


def test_params_are_introspected_with_help(lab):
    ps = {p.name: p for p in registry.params(registry.get("tkind", "outer"))}
    assert ps["size"].default == 32 and ps["size"].type == "int" and ps["size"].help == "image size"
    assert ps["levels"].default == [8, 5] and ps["sub"].slot == "tsub"
    with pytest.raises(ConfigError, match=r"tkind 'outr' is not registered\. Did you mean 'outer'\?"):
        registry.get("tkind", "outr")


def test_build_validates_like_experiments(lab):
    obj = C.build("tsub", {"type": "big", "width": 3})
    assert obj.cfg.width == 3 and obj.cfg.depth == 2
    with pytest.raises(ConfigError, match="tsub.wdth: unknown parameter of tsub/big"):
        C.build("tsub", {"type": "big", "wdth": 3})
    cfg = registry.get("tsub", "big").config(width=5)
    assert C.build("tsub", cfg).cfg is cfg
    assert dataclasses.is_dataclass(C.build("tsub", "small").cfg)


# ----------------------------------------------------------------------------- the real repo


def _repo_presets():
    from arlab.config import presets

    return [(k, n) for k in registry.kinds() for n in presets(k)]


@pytest.mark.parametrize("kind,name", _repo_presets())
def test_every_repo_preset_validates(kind, name):
    C.validate_preset(kind, name)


@pytest.mark.parametrize("name", sorted(C.experiments()))
def test_every_repo_experiment_validates(name):
    exp = C.load_experiment(name)
    assert exp.name == name


@pytest.mark.parametrize("cuda, bf16_gpu, cpu_bf16, cpu_amx, accelerator, expected", [
    (False, False, True, False, "auto", "bf16-mixed"),  # AVX512-BF16 CPU
    (False, False, False, True, "cpu", "bf16-mixed"),  # AMX CPU
    (False, False, False, False, "auto", "32-true"),  # AVX2-only CPU: bf16 would be emulated
    (True, True, False, False, "auto", "bf16-mixed"),  # Ampere+ GPU
    (True, False, True, True, "gpu", "32-true"),  # a GPU without bf16, whatever the CPU has
    (True, True, False, False, "cpu", "32-true"),  # trained on the CPU of a GPU machine: the CPU decides
])
def test_auto_bf16_picks_bf16_only_where_the_device_computes_it_natively(
        monkeypatch, cuda, bf16_gpu, cpu_bf16, cpu_amx, accelerator, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(C, "cpu_bf16_flags", lambda: {"onednn": True, "avx512_bf16": cpu_bf16, "amx": cpu_amx})
    t = C.TrainerConfig(precision="auto-bf16", accelerator=accelerator)
    assert t.lightning_kwargs()["precision"] == expected
    assert C.TrainerConfig(precision="bf16-mixed").lightning_kwargs()["precision"] == "bf16-mixed"  # explicit: kept


def test_auto_bf16_follows_onednn_held_to_avx2(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AMX CPU: oneDNN has no bf16 kernels, so float32 (bf16 was 13x slower)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(C, "cpu_bf16_flags", lambda: {"onednn": False, "avx512_bf16": True, "amx": True})
    assert C.resolve_precision("auto-bf16") == "32-true"


def test_cpu_bf16_flags_reads_this_machine():
    flags = C.cpu_bf16_flags()
    assert set(flags) == {"onednn", "avx512_bf16", "amx"} and all(isinstance(v, bool) for v in flags.values())
    assert C.resolve_precision("auto-bf16", "cpu") == ("bf16-mixed" if flags["onednn"] and (
        flags["avx512_bf16"] or flags["amx"]) else "32-true")
