"""A timm image network as the image tower (model.arch: timm:<name>): its own weights and preprocessing,
no text side, and the bundle it trains into served, classified and read like any other."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from conftest import write_test_bundle
from PIL import Image
from support.serving import deploy, serve_http_port, settings
from support.training import CLASSES, write_refine_artifacts

from near_ray.config import ConfigError, ModelConfig, load_config
from near_ray.images import decode_image
from near_ray.storage import Storage, join

ARCH = "timm:test_efficientnet"  # timm's smallest EfficientNet (random init: no weights download)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_the_backbones_own_weights_give_its_own_features_and_a_wrong_file_is_named(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from near_ray.errors import NearRayError
    from near_ray.model.clip import create_clip, encode_images

    torch.manual_seed(3)
    net = timm.create_model("test_efficientnet", pretrained=False).eval()  # with its classifier head
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    clip = create_clip(ModelConfig(arch=ARCH, pretrained=str(weights)))
    # the network's preprocessing, from timm's pretrained config
    assert (clip.pixels.size, clip.pixels.mean) == (160, (0.485, 0.456, 0.406)) and clip.text == "none"
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (200, 240), dtype=np.uint8), "L")
    ours = encode_images(clip, [grey])
    from near_ray.model.preprocess import preprocessor

    x = preprocessor(clip.pixels).batch([preprocessor(clip.pixels).pixels(grey)])
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(net.forward_head(net.forward_features(x), pre_logits=True), dim=-1)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)
    # a grey image is its RGB copy on the one pixel path
    np.testing.assert_allclose(ours, encode_images(clip, [grey.convert("RGB")]), atol=1e-6)

    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()}, str(other))
    with pytest.raises(NearRayError, match="other.safetensors"):
        create_clip(ModelConfig(arch=ARCH, pretrained=str(other)))
    with pytest.raises(NearRayError, match="not a weights file"):
        create_clip(ModelConfig(arch=ARCH, pretrained="imagenet"))
    with pytest.raises(NearRayError, match="not a timm model"):
        create_clip(ModelConfig(arch="timm:no_such_net", pretrained="random"))


@pytest.mark.parametrize("arch", ["timm:test_vit", "torchvision:mobilenet_v3_small"])
def test_networks_whose_head_is_not_a_pool_and_a_linear_load_their_own_weights(tmp_path, arch):
    """A timm ViT embeds by its CLS token (its own pool), not a mean; a torchvision network whose classifier
    has layers before its last linear one keeps them (and drops the classifier's dropout)."""
    import timm
    import torch
    import torchvision
    from safetensors.torch import save_file

    from near_ray.model.clip import create_clip, encode_images
    from near_ray.model.preprocess import preprocessor

    torch.manual_seed(11)
    library, name = arch.split(":")
    net = (timm.create_model(name, pretrained=False) if library == "timm" else torchvision.models.get_model(name)).eval()
    weights = tmp_path / "net.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    clip = create_clip(ModelConfig(arch=arch, pretrained=str(weights)))
    image = Image.fromarray(np.random.default_rng(4).integers(0, 255, (70, 90, 3), dtype=np.uint8))
    x = preprocessor(clip.pixels).batch([preprocessor(clip.pixels).pixels(image)])
    with torch.no_grad():
        if library == "timm":
            feats = net.forward_head(net.forward_features(x), pre_logits=True)
        else:
            net.classifier[-1] = torch.nn.Identity()
            feats = net(x)
    np.testing.assert_allclose(encode_images(clip, [image]), torch.nn.functional.normalize(feats, dim=-1).numpy(),
                               atol=1e-5)
    if library == "torchvision":  # in training mode too: no dropout left on the embedding
        clip.model.visual.train()
        with torch.no_grad():
            a, b = clip.model.visual(x), clip.model.visual(x)
        assert torch.equal(a, b)


def test_a_torchvision_network_gives_its_own_features_and_a_bundle_keeps_them(tmp_path):
    import torch
    import torchvision
    from safetensors.torch import save_file

    from near_ray.model.bundle import load_bundle
    from near_ray.model.clip import create_clip, encode_images
    from near_ray.model.preprocess import preprocessor

    torch.manual_seed(5)
    net = torchvision.models.resnet18(weights=None).eval()
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))  # fc included: ignored
    clip = create_clip(ModelConfig(arch="torchvision:resnet18", pretrained=str(weights)))
    assert clip.model_config["embed_dim"] == 512 and clip.text == "none" and clip.pixels.size == 224
    grey = Image.fromarray(np.random.default_rng(2).integers(0, 255, (90, 130), dtype=np.uint8), "L")
    ours = encode_images(clip, [grey])
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        x = preprocessor(clip.pixels).batch([preprocessor(clip.pixels).pixels(grey)])
        theirs = torch.nn.functional.normalize(net(x), dim=-1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    uri = str(tmp_path / "bundle")
    write_test_bundle(uri, [("a", "d"), ("b", "d")], np.eye(2, 512), clip=clip, prompt_template="{}", logit_scale=10.0)
    np.testing.assert_allclose(load_bundle(uri).embed([grey]), ours, atol=1e-6)  # rebuilt offline, same pixels


def test_a_hugging_face_vision_model_from_a_folder_gives_its_own_features_and_a_bundle_keeps_them(tmp_path):
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    from near_ray.model.bundle import load_bundle
    from near_ray.model.clip import create_clip, encode_images
    from near_ray.model.preprocess import preprocessor

    torch.manual_seed(7)
    folder = tmp_path / "tiny-vit"
    net = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=64, image_size=48, patch_size=16, num_labels=3))
    net.save_pretrained(folder)  # keys under "vit.", a classifier head, no pooler: as classification checkpoints are
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 48, "width": 48},
         "resample": 2}))
    clip = create_clip(ModelConfig(arch=f"hf:{folder}", pretrained=str(folder)))
    assert (clip.pixels.size, clip.pixels.mean, clip.pixels.interpolation) == (48, (0.5, 0.5, 0.5), "bilinear")
    assert clip.pixels.resize_mode == "squash"  # resized to height x width, no crop: as its processor does
    grey = Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 80), dtype=np.uint8), "L")
    ours = encode_images(clip, [grey])
    with torch.no_grad():
        x = preprocessor(clip.pixels).batch([preprocessor(clip.pixels).pixels(grey)])
        theirs = torch.nn.functional.normalize(net.eval().vit(pixel_values=x).last_hidden_state[:, 0], dim=-1)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)
    uri = str(tmp_path / "bundle")
    write_test_bundle(uri, [("a", "d")], np.eye(1, 32), clip=clip, prompt_template="{}", logit_scale=10.0)
    (folder / "model.safetensors").unlink()  # the bundle needs nothing of the folder
    np.testing.assert_allclose(load_bundle(uri).embed([grey]), ours, atol=1e-6)


@pytest.mark.parametrize("override,field", [
    ("train.method=near_text_only", "train.method near_text_only"),
    ("train.select=[near,near_paper]", "train.select near_paper"),
    ("eval.methods=[near,zero_shot]", "eval.methods zero_shot"),
    ("train.prototype_weight=0.5", "train.prototype_weight 0.5"),
    ("refine.merge_encoder=clip", "refine.merge_encoder 'clip'"),
])
def test_a_model_without_text_refuses_text_classifiers_at_load(tmp_path, override, field):
    base = [f"storage.workdir={tmp_path}", f"model.arch={ARCH}", "model.pretrained=random"]
    with pytest.raises(ConfigError, match="has no text side") as e:
        load_config(None, [*base, override])
    assert field in str(e.value)
    cfg = load_config(None, base)  # the default list of evaluated methods just leaves them out
    assert cfg.train.method == "naive_prototypes"
    assert "zero_shot" not in cfg.eval.methods and "near_text_only" not in cfg.eval.methods
    assert "near" in cfg.eval.methods


def test_a_backbone_bundle_trains_serves_and_classifies_like_any_other(ray_cluster, tmp_path, capsys):
    """train (Ray Train) -> bundle -> Ray Serve over HTTP and the classify stage, grey images included."""
    from near_ray.classify.stage import run_classify
    from near_ray.classify.table import read_predictions
    from near_ray.cli import main
    from near_ray.model.bundle import load_bundle

    workdir, st = str(tmp_path), Storage()
    write_refine_artifacts(workdir, per_class=3)
    sets = [f"storage.workdir={workdir}", f"model.arch={ARCH}", "model.pretrained=random", "train.num_workers=1",
            "train.cpus_per_worker=0.5", "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=16",
            "train.augment=false"]
    assert main(["train", *(x for s in sets for x in ("--set", s)), "--method", "naive_prototypes"]) == 0
    text = capsys.readouterr().out  # Ray's raylet may print a warning line first, on a loaded machine
    out = json.JSONDecoder().raw_decode(text[text.index("{\n"):])[0]
    uri = out["naive_prototypes"]["bundle"]
    bundle = load_bundle(uri)
    config = st.read_json(join(uri, "config.json"))
    assert config["model_config"]["vision_cfg"]["timm_model_name"] == "test_efficientnet"
    assert config["model_config"]["text"] == "none" and config["preprocess"]["size"] == 160
    assert sorted(bundle.names) == sorted(n for names in CLASSES.values() for n in names)

    # grey images of the classes' colours, as PNG files of their own folder
    rng = np.random.default_rng(1)
    folder = join(workdir, "new", "birds")
    greys = [_png(rng.integers(0, 255, (48, 64), dtype=np.uint8)) for _ in range(4)]
    for i, data in enumerate(greys):
        st.write_bytes(join(folder, f"g{i}.png"), data)
    want = bundle.classify([decode_image(b) for b in greys], top_k=3, domain="birds")

    port = serve_http_port()
    from ray import serve

    deploy("near_backbone", settings(bundle=uri))
    try:
        for data, pred in zip(greys, want, strict=True):
            r = httpx.post(f"http://127.0.0.1:{port}/near_backbone/v1/classify?domain=birds&top_k=3",
                           files={"file": ("g.png", data, "image/png")}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert [p["name"] for p in body["predictions"]] == pred.names
            np.testing.assert_allclose([p["score"] for p in body["predictions"]], pred.scores, atol=1e-5)
            assert body["model_version"] == bundle.model_version
    finally:
        serve.delete("near_backbone")

    cfg = load_config(None, [*sets, f"classify.bundle={uri}", "classify.top_k=3",
                             f'data.domains=[{{"name": "birds", "uri": "{folder}", "meta_class": "bird"}}]'])
    summary = run_classify(cfg)
    assert summary["images_computed"] == 4
    df = read_predictions(cfg.artifact("predictions"), st).sort_values("uri")
    assert df["name"].tolist() == [p.names[0] for p in want]


def test_the_preflight_names_an_unknown_network_or_a_tag_before_any_work(tmp_path):
    from near_ray.preflight import Context, Failed, check_model

    def check(arch: str, pretrained: str) -> str:
        cfg = load_config(None, [f"storage.workdir={tmp_path}", f"model.arch={arch}", f"model.pretrained={pretrained}"])
        return check_model(Context(cfg=cfg, command="run", storage=Storage()))

    with pytest.raises(Failed, match="'no_such_net' is not a timm model"):
        check("timm:no_such_net", "random")
    with pytest.raises(Failed, match="'imagenet' is not a weights file"):
        check(ARCH, "imagenet")
    with pytest.raises(Failed, match="no config.json there"):
        check(f"hf:{tmp_path}/none", f"{tmp_path}/none")
    assert "from random weights" in check("torchvision:resnet18", "random")
    with pytest.raises(Failed, match="not a torchvision classification model"):
        check("torchvision:fasterrcnn_resnet50_fpn", "random")
    with pytest.raises(Failed, match="weights file lite0.safetensors not found"):  # a file name, not a tag
        check(ARCH, "lite0.safetensors")


def test_the_train_command_refuses_a_text_classifier_for_a_network_without_text(tmp_path, capsys):
    from near_ray.cli import main

    write_refine_artifacts(str(tmp_path), per_class=3)
    sets = [f"storage.workdir={tmp_path}", f"model.arch={ARCH}", "model.pretrained=random"]
    for method in ("zero_shot", "near_text_only"):
        assert main(["train", *(x for s in sets for x in ("--set", s)), "--method", method]) != 0
        assert f"--method {method}: model.arch {ARCH} has no text side" in capsys.readouterr().err
    assert not (tmp_path / "bundles").exists() and not (tmp_path / "train").exists()  # nothing ran
