"""Tests for sd_jax/nn/structure.py: the authors' structure files mapped onto zoo layer names."""
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util
import numpy as np
import pytest

from experiments.configs import paper
from sd_jax import models
from sd_jax.models import registry
from sd_jax.core.decompose import DecomposeOptions
from sd_jax.nn import SDRules
from sd_jax.nn.structure import read_fractions, reference_order, structure_rules

RESNET18_FILES = ("resnet18-structure-percentage.txt", "resnet18-structure-percentage-smaller.txt",
                  "resnet18-structure-percentage-smaller-smaller.txt", "resnet18-structure-percentage-smaller3.txt")
MOBILENET_FILES = ("mobilenetv2-structure-percentage.txt", "mobilenetv2-structure-percentage-smaller.txt")


def _layers(name, **options):
    return registry.layer_names(models.get(name, num_classes=10, **options))


def _torch_shapes(name, layers, **options):
    """PyTorch weight shapes (cout, cin / groups, kh, kw) or (out, in) of the zoo model's `layers`."""
    model = models.get(name, num_classes=10, **options)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))["params"]
    kernels = traverse_util.flatten_dict(params, sep="/")
    shapes = []
    for layer in layers:
        shape = kernels[f"{layer}/kernel"].shape
        shapes.append((shape[1], shape[0]) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1]))
    return shapes


def _authors_resnet18_shapes():
    """Weights of rank >= 2 of the authors' ResNet18 (SmartDeal-Training/models/resnet.py), in module
    order: conv1, then per BasicBlock conv1, conv2 and, where the shape changes, the 1x1 shortcut."""
    shapes, in_planes = [(64, 3, 3, 3)], 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block_stride in (stride, 1):
            shapes += [(planes, in_planes, 3, 3), (planes, planes, 3, 3)]
            if block_stride != 1 or in_planes != planes:
                shapes.append((planes, in_planes, 1, 1))
            in_planes = planes
    return shapes + [(10, 512)]


def _authors_mobilenetv2_shapes():
    """The same for their MobileNetV2 (models/mobilenetv2.py, CIFAR cfg): per Block the 1x1 expand
    conv, the depthwise 3x3, the 1x1 project conv and, on stride-1 blocks whose width changes, a 1x1
    shortcut; then the 1x1 conv to 1280 and the linear layer."""
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    shapes, in_planes = [(32, 3, 3, 3)], 32
    for expansion, out_planes, blocks, stride in cfg:
        for block_stride in [stride] + [1] * (blocks - 1):
            planes = expansion * in_planes
            shapes += [(planes, in_planes, 1, 1), (planes, 1, 3, 3), (out_planes, planes, 1, 1)]
            if block_stride == 1 and in_planes != out_planes:
                shapes.append((out_planes, in_planes, 1, 1))
            in_planes = out_planes
    return shapes + [(1280, 320, 1, 1), (10, 1280)]


@pytest.mark.parametrize("name, lines",
                         [(name, 21) for name in RESNET18_FILES] + [(name, 58) for name in MOBILENET_FILES])
def test_shipped_files_read_as_the_authors_read_them(name, lines):
    path = paper.STRUCTURE_DIR / name
    values = read_fractions(path)
    assert len(values) == lines
    assert values == np.loadtxt(path).tolist()


def test_resnet18_lines_map_to_the_layers_of_the_authors_module_order():
    layers = _layers("resnet18")
    ordered = reference_order(layers)
    assert sorted(ordered) == sorted(layers)
    assert _torch_shapes("resnet18", ordered) == _authors_resnet18_shapes()
    path = paper.STRUCTURE_DIR / "resnet18-structure-percentage.txt"
    rules = structure_rules(path, layers, model="resnet18")
    values = read_fractions(path)
    assert [pattern for pattern, _ in rules] == [f"^{layer}$" for layer in ordered]
    assert [options for _, options in rules] == [{"prune_criterion": "population", "prune_fraction": v} for v in values]
    # The block's shortcut takes the line after its conv2 (PyTorch registers `shortcut` last).
    assert [rules[i][0] for i in (5, 6, 7)] == ["^stage2_block0/conv1$", "^stage2_block0/conv2$",
                                                "^stage2_block0/shortcut_conv$"]
    assert rules[0][0] == "^stem/conv$" and rules[-1][0] == "^head/dense$"


@pytest.mark.parametrize("name", MOBILENET_FILES)
def test_mobilenet_v2_lines_map_to_the_authors_block(name):
    layers = _layers("mobilenet_v2", smartdeal_reference=True)
    ordered = reference_order(layers)
    assert ordered == layers  # the zoo builds this block in the authors' order
    assert _torch_shapes("mobilenet_v2", ordered, smartdeal_reference=True) == _authors_mobilenetv2_shapes()
    rules = structure_rules(paper.STRUCTURE_DIR / name, layers, model="mobilenet_v2")
    fractions = {pattern: options["prune_fraction"] for pattern, options in rules}
    # Every depthwise conv falls on one of the file's zero lines, and every shortcut on a 1x1 line.
    depthwise = [pattern for pattern in fractions if "depthwise" in pattern]
    assert len(depthwise) == 17 and all(fractions[pattern] == 0 for pattern in depthwise)
    assert [i + 1 for i, (pattern, _) in enumerate(rules) if "shortcut" in pattern] == [5, 9, 37, 56]


def test_a_count_that_does_not_fit_names_the_file_the_model_and_both_counts():
    path = paper.STRUCTURE_DIR / "mobilenetv2-structure-percentage.txt"
    with pytest.raises(ValueError, match=r"mobilenetv2-structure-percentage.txt' has 58 lines, but model "
                                         r"'mobilenet_v2' has 53 conv and dense layers.*smartdeal_reference=True"):
        structure_rules(path, _layers("mobilenet_v2"), model="mobilenet_v2")
    with pytest.raises(ValueError, match="has 21 lines, but model 'resnet34' has 37 conv and dense layers"):
        structure_rules(paper.STRUCTURE_DIR / RESNET18_FILES[0], _layers("resnet34"), model="resnet34")


@pytest.mark.parametrize("text, message", [
    ("0.1\n0.2 0.3\n", "line 2: 2 numbers"),
    ("0.1\nhalf\n", "line 2: 'half' is not a finite number"),
    ("0.1\nnan\n", "line 2: 'nan' is not a finite number"),
    ("\n# nothing\n", "holds no numbers"),
])
def test_bad_files_raise_naming_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"structure file '.*bad.txt'.*{message}"):
        read_fractions(path)


def test_the_authors_two_column_file_is_refused():
    with pytest.raises(ValueError, match="c10-c100.txt', line 1: 2 numbers"):
        read_fractions(paper.STRUCTURE_DIR / "mobilenetv2-structure-percentage-c10-c100.txt")


def test_a_missing_file_and_a_fraction_out_of_range_raise(tmp_path):
    with pytest.raises(ValueError, match="structure file '.*absent.txt' cannot be read"):
        read_fractions(tmp_path / "absent.txt")
    path = tmp_path / "big.txt"
    path.write_text("0.5\n1.0\n")
    with pytest.raises(ValueError, match=r"big.txt', line 2 \(layer 'b/conv'\): prune_fraction=1.0 must be in"):
        structure_rules(path, ["a/conv", "b/conv"], model="toy")


def test_comments_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "fractions.txt"
    path.write_text("# stem\n0.1\n\n0.2  # block\n")
    assert read_fractions(path) == [0.1, 0.2]


def test_reference_order_moves_each_shortcut_behind_its_block():
    layers = ["stem/conv", "s1_b0/shortcut_conv", "s1_b0/conv1", "s1_b0/conv2", "s1_b1/conv1", "head/dense"]
    assert reference_order(layers) == ["stem/conv", "s1_b0/conv1", "s1_b0/conv2", "s1_b0/shortcut_conv",
                                       "s1_b1/conv1", "head/dense"]


def test_value_and_energy_numbers_become_prune_thresholds(tmp_path):
    path = tmp_path / "thresholds.txt"
    path.write_text("0.5\n0.7\n")
    rules = structure_rules(path, ["a/conv", "b/conv"], model="toy", criterion="energy")
    assert rules[1] == ("^b/conv$", {"prune_criterion": "energy", "prune_threshold": 0.7})
    with pytest.raises(ValueError, match="criterion 'l1' is not one of"):
        structure_rules(path, ["a/conv", "b/conv"], model="toy", criterion="l1")


def test_rules_build_the_sd_model_and_survive_a_config():
    rules = paper.structure_rules("cifar10_jpeg", "resnet18")
    config = ml_collections.ConfigDict({"sd": {"rules": rules, "threshold": 1e-3}})
    sd_rules = SDRules.from_config(config)  # as every mode reads it
    model = models.get("resnet18", num_classes=10, sd=sd_rules)  # every rule matches a layer
    assert registry.layer_names(model) == _layers("resnet18")
    assert sd_rules.kernel_plan("stage2_block0/shortcut_conv", (1, 1, 64, 128)) == (
        "conv", DecomposeOptions(threshold=1e-3, prune_criterion="population", prune_fraction=0.1))


def test_paper_names_a_file_for_each_of_the_authors_structural_runs():
    assert paper.structure_file("cifar100", "resnet18").name == "resnet18-structure-percentage-smaller3.txt"
    assert paper.structure_file("cifar10", "resnet20") is None
    for dataset, model in paper.STRUCTURE_FILES:
        options = {"smartdeal_reference": True} if model == "mobilenet_v2" else {}
        assert len(paper.structure_rules(dataset, model, **options)) == len(_layers(model, **options))
    with pytest.raises(ValueError, match="no structure file for 'vgg19' on 'cifar10'"):
        paper.structure_rules("cifar10", "vgg19")
