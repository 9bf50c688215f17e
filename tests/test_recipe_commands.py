"""Every shipped recipe through every command after training, offline: `train` a few steps, then
`data inspect` and `mine` on the recipe, `export` the run, `index` a corpus with the export, `search` it,
and `push --dry-run` both the run and the export.

A recipe that names a hub model or dataset runs with `key.sub=value` overrides that point it at a tiny local
stand-in (the same `from_pretrained(path)` / `load_dataset(path)` code a hub id takes); synthetic sets are
shrunk. A new recipe is picked up by the glob; one naming a hub id without a stand-in below fails, naming it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest
import yaml
from accelerate.state import AcceleratorState

from data_tools.loading import decode_image, load_image_text_dataset
from finetune.cli.main import main as cli_main
from finetune.config.load import load_config, load_resolved_config
from finetune.config.schema import looks_like_local_path
from finetune.config.specs import dataset_arguments, dataset_specs
from finetune.retrieval.index import parse_corpus
from tests.test_labels_e2e import ham_like_dir  # noqa: F401  (a fixture: HAM10000's columns, no captions)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LANGUAGES = ("en", "de", "es", "zh")
K = 3  # search hits asked for; every corpus below holds more images than this

# Hub id -> the fixture of its local stand-in. A recipe's local folders (recipes/assets/...) are used as they are.
MODEL_STANDINS = {
    "openai/clip-vit-base-patch16": "tiny_clip_dir",
    "openai/clip-vit-base-patch32": "tiny_clip_dir",
    "xlm-roberta-base": "tiny_xlmr_dir",
}
DATASET_STANDINS = {
    "ashraq/fashion-product-images-small": "fashion_like_dir",
    "mdwiratathya/ROCO-radiology": "roco_like_dir",
    "marmal88/skin_cancer": "ham_like_dir",
    "floschne/xm3600": "xm3600_like_dir",
    "M-CLIP/ImageCaptions-7M-Translations": "mclip_like_dir",
}
SMALL = [
    "train.epochs=null",
    "train.max_steps=2",
    "train.batch_size=8",
    "train.log_every_steps=1",
    "eval.batch_size=64",
    "data.num_workers=0",
    "data.max_text_length=32",  # every model here (stand-ins and demo assets) reads at least 32 tokens
]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture(scope="module")
def xm3600_like_dir(tmp_path_factory) -> Path:
    """XM3600's layout: one parquet split per language (en, de, es, zh), columns image, captions (a list), image_id;
    the same images in every split, captioned in that split's language."""
    root = tmp_path_factory.mktemp("xm3600-like")
    (root / "data").mkdir()
    features = datasets.Features(
        {"image": datasets.Image(), "captions": datasets.List(datasets.Value("string")), "image_id": datasets.Value("string")}
    )
    for lang in LANGUAGES:
        pairs = load_image_text_dataset(key="xm3600-like", synthetic=dict(domain="source", num_images=24, seed=1, languages=[lang]))
        ds = datasets.Dataset.from_dict(
            {
                "image": pairs["image"],
                "captions": [[c] for c in pairs["caption"]],
                "image_id": [f"xm_{i:04d}" for i in pairs["image_index"]],
            },
            features=features,
        )
        ds.to_parquet(str(root / "data" / f"{lang}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="module")
def mclip_like_dir(tmp_path_factory) -> Path:
    """M-CLIP's translated captions: one train split, columns caption (English) and caption_multi (a translation)."""
    root = tmp_path_factory.mktemp("mclip-like")
    (root / "data").mkdir()
    english, multi = [], []
    for lang in LANGUAGES[1:]:  # the same renders (same seed) in English and in `lang`: row-aligned captions
        en = load_image_text_dataset(key="mclip-like", synthetic=dict(domain="source", num_images=16, seed=5))
        other = load_image_text_dataset(key="mclip-like", synthetic=dict(domain="source", num_images=16, seed=5, languages=[lang]))
        english += en["caption"]
        multi += other["caption"]
    datasets.Dataset.from_dict({"caption": english, "caption_multi": multi}).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def standin(table: dict, name: str, where: str, request) -> str:
    """The local folder standing in for hub id `name`; a hub id without one fails the test, naming it."""
    if name not in table:
        which = "MODEL_STANDINS" if table is MODEL_STANDINS else "DATASET_STANDINS"
        pytest.fail(f"{where}={name}: a hub id with no local stand-in; add one to {which} in {Path(__file__).name}")
    return str(request.getfixturevalue(table[name]))


def offline_overrides(recipe: Path, out: Path, request) -> list[str]:
    """Overrides that run `recipe` offline and in seconds: stand-ins for hub ids, small synthetic sets, few steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recipe's own notices; test_recipes.py checks them
        cfg = load_config(recipe)
    overrides = [f"train.output_dir={out / 'run'}", *SMALL]
    for key in ("name_or_path", "text_tower"):
        name = getattr(cfg.model, key)
        if name is not None and not looks_like_local_path(name):
            overrides.append(f"model.{key}={standin(MODEL_STANDINS, name, f'model.{key}', request)}")
    for key, spec in dataset_specs(cfg, replay=False).items():
        if spec.path is not None and not looks_like_local_path(spec.path):
            overrides.append(f"{key}.path={standin(DATASET_STANDINS, spec.path, f'{key}.path', request)}")
        elif spec.synthetic is not None:
            overrides.append(f"{key}.synthetic.num_images={24 if key == 'data.train' else 12}")
    replay = []  # a list: replaced whole, each set shrunk (or pointed at its stand-in)
    for i, spec in enumerate(cfg.data.replay):
        item = spec.model_dump(mode="json", exclude_defaults=True)
        if spec.synthetic is not None:
            item["synthetic"]["num_images"] = 8
        elif spec.path is not None and not looks_like_local_path(spec.path):
            item["path"] = standin(DATASET_STANDINS, spec.path, f"data.replay.{i}.path", request)
        replay.append(item)
    if replay:
        overrides.append(f"data.replay={json.dumps(replay)}")
    if cfg.distill is not None:
        overrides += ["distill.max_steps=4", "distill.batch_size=16", "distill.warmup_steps=1"]
        data = cfg.distill.data
        if data.path is not None and not looks_like_local_path(data.path):
            overrides.append(f"distill.data.path={standin(DATASET_STANDINS, data.path, 'distill.data.path', request)}")
        elif data.synthetic is not None:
            overrides.append("distill.data.synthetic.num_samples=32")
    return overrides


def run_cli(args: list[str], capsys) -> str:
    """`domainclip ARGS` in this process; asserts exit 0 and returns what it printed."""
    code = cli_main([str(a) for a in args])
    printed = capsys.readouterr()
    assert code == 0, f"domainclip {' '.join(map(str, args[:2]))} exited {code}:\n{printed.err[-3000:]}"
    return printed.out


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_command_accepts_the_recipe_and_its_run(recipe, tmp_path, request, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # recipes name their assets relative to the repository root
    overrides = offline_overrides(recipe, tmp_path, request)
    run = tmp_path / "run"

    # train: the run folder every later command reads
    run_cli(["train", recipe, *overrides], capsys)
    AcceleratorState._reset_state(True)
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "config.yaml").is_file()
    cfg = load_resolved_config(run / "config.yaml")
    specs = dataset_specs(cfg)

    # data inspect: one report per dataset the recipe names, through the same resolver training used
    printed = run_cli(["data", "inspect", recipe, *overrides, "--out", tmp_path / "report"], capsys)
    report = json.loads((tmp_path / "report" / "data_report.json").read_text())
    assert set(report) == set(specs), printed
    assert (tmp_path / "report" / "longtail.png").read_bytes()[:4] == b"\x89PNG"
    assert all(key in printed for key in specs)

    # mine: with the base model, and with the run's adapter (the only choice for a swapped, untrained text tower)
    mined = {"adapter": ["--adapter", run]}
    if cfg.model.text_tower is None:
        mined["base"] = []
    else:
        assert cli_main(["mine", str(recipe), *overrides]) == 2
        assert "mine with --adapter RUN_DIR" in capsys.readouterr().err
    corpus = load_image_text_dataset(key="data.train", **dataset_arguments(cfg.data.train, cfg.train.seed))  # indexed below too
    num_pairs = len(corpus)
    for name, args in mined.items():
        out = tmp_path / "mining" / f"{name}.parquet"
        run_cli(["mine", recipe, *overrides, *args, "--out", out], capsys)
        summary = json.loads(out.with_suffix(".json").read_text())
        table = pq.read_table(out).to_pydict()
        assert summary["num_pairs"] == num_pairs and summary["rows"] == len(table["anchor_row"])
        assert all(0 <= r < num_pairs for r in table["anchor_row"] + table["negative_row"])

    # export: a merged folder with its manifest, evaluated on the run's target (or first language) set
    export = tmp_path / "export"
    run_cli(["export", run, "--out", export], capsys)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["format"] == "domainclip-export/1" and manifest["dtype"] == "fp32"
    assert (export / "model.safetensors").is_file() and (export / "eval" / "results.json").is_file()
    assert "target" in manifest["results"]["fp32"]

    # index: the run's training set, named through the resolved config the run wrote, both modalities
    index = tmp_path / "index"
    run_cli(["index", export, "--corpus", f"recipe:{run / 'config.yaml'}:data.train", "--out", index, "--modality", "both"], capsys)
    index_manifest = json.loads((index / "manifest.json").read_text())
    assert index_manifest["model_sha256"] == manifest["weights_sha256"]
    num_images = len(set(corpus["image_index"]))
    assert num_images > K
    for kind, vectors in (("image", num_images), ("text", len(corpus))):
        entry = index_manifest["indexes"][kind]
        assert entry["vectors"] == vectors and (index / entry["file"]).is_file() and (index / entry["id_map"]).is_file()

    # search: text -> image returns K ranked hits; a corpus image retrieves itself first
    hits = json.loads(run_cli(["search", index, "--text", corpus[0]["caption"], "-k", K, "--json"], capsys))["hits"]
    assert [h["rank"] for h in hits] == list(range(1, K + 1))
    query = tmp_path / "query.png"
    decode_image(corpus[0]["image"]).save(query)
    hits = json.loads(run_cli(["search", index, "--image", query, "-k", K, "--json"], capsys))["hits"]
    assert len(hits) == K and hits[0]["image_id"] == corpus[0]["image_id"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-3)

    # push --dry-run: the folder that would go up, listed, with a card whose model-index carries the metrics
    for folder, promised in ((run, {"adapter_model.safetensors", "adapter_config.json"}), (export, {"model.safetensors", "manifest.json"})):
        staging = tmp_path / f"hub-{folder.name}"
        printed = run_cli(["push", folder, "--repo", f"me/{recipe.stem}", "--dry-run", "--staging", staging], capsys)
        files = {str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()}
        assert {"README.md", "config.yaml", "eval/results.json", *promised} <= files
        assert {line.strip() for line in printed.splitlines() if line.startswith("  ")} == files
        assert f"Dry run: {len(files)} files for me/{recipe.stem}" in printed
        card = yaml.safe_load((staging / "README.md").read_text().split("---")[1])
        assert card["model-index"][0]["results"]
        # The card's usage loads what was uploaded: a swapped text tower needs its dual encoder beside the adapter.
        swapped = cfg.model.text_tower is not None
        model_class = "VisionTextDualEncoderModel" if swapped else "CLIPModel"
        assert f"{model_class}.from_pretrained(" in (staging / "README.md").read_text()
        if folder == run and swapped:
            assert {"base_model/config.json", "base_model/model.safetensors"} <= files


def test_index_corpus_reaches_every_dataset_a_recipe_names(monkeypatch):
    """`index --corpus recipe:PATH[:KEY]`: every key `dataset_specs` names resolves to that spec and the recipe's
    template seed; without KEY, the set the export is evaluated on (the target, or the first language)."""
    monkeypatch.chdir(ROOT)
    for recipe in RECIPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = load_config(recipe)
            specs = dataset_specs(cfg)
            for key, spec in specs.items():
                assert parse_corpus(f"recipe:{recipe}:{key}") == (spec, cfg.train.seed), (recipe.name, key)
            default = "data.eval.target" if "data.eval.target" in specs else next(k for k in specs if k.startswith("data.eval.languages."))
            assert parse_corpus(f"recipe:{recipe}") == (specs[default], cfg.train.seed), recipe.name
