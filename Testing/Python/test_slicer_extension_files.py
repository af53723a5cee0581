"""The Slicer extension's files agree with each other and with the library.

KneeBoneSeg.py needs the Slicer application (qt, ctk, slicer.util) to import,
so it is read as a syntax tree here; the .ui file as XML; the CMake lists as text.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import re
import struct
import xml.etree.ElementTree as ElementTree
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "KneeBoneSeg"
MODULE_SOURCE = MODULE_DIR / "KneeBoneSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "KneeBoneSeg.ui"

#: The widget class each name the module uses must have in the .ui file.
EXPECTED_WIDGETS = {
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "segmentButton": "QPushButton",
    "advancedCollapsibleButton": "ctkCollapsibleButton",
    "modelPathLineEdit": "ctkPathLineEdit",
    "threeProjectionsCheckBox": "QCheckBox",
    "fusionComboBox": "QComboBox",
    "closingRadiusSliderWidget": "ctkSliderWidget",
    "closingUnitsComboBox": "QComboBox",
    "smoothingIterationsSpinBox": "QSpinBox",
    "deviceComboBox": "QComboBox",
    "deviceLabel": "QLabel",
    "progressBar": "QProgressBar",
    "stageLabel": "QLabel",
    "cancelButton": "QPushButton",
    "statusLabel": "QLabel",
    "show3DButton": "qMRMLSegmentationShow3DButton",
    "exportDirectoryButton": "ctkDirectoryButton",
    "exportSTLButton": "QPushButton",
}

#: Which widget class Slicer's parameterNodeWrapper connects to which parameter type.
CONNECTABLE = {
    "bool": {"QCheckBox"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "str": {"QComboBox", "QLineEdit"},
    "vtkMRMLScalarVolumeNode": {"qMRMLNodeComboBox"},
    "vtkMRMLSegmentationNode": {"qMRMLNodeComboBox"},
}


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_SOURCE.read_text(encoding="utf-8"), filename=str(MODULE_SOURCE))


@pytest.fixture(scope="module")
def ui_widgets() -> dict[str, ElementTree.Element]:
    return {widget.get("name"): widget for widget in ElementTree.parse(UI_FILE).iter("widget")}


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    found = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name]
    assert found, f"KneeBoneSeg.py defines no class {name}"
    return found[0]


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    found = [node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == name]
    assert found, f"{cls.name} has no method {name}"
    return found[0]


def _constant(tree: ast.Module, name: str):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == name for target in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"KneeBoneSeg.py defines no constant {name}")


def _cmake_lists(path: Path) -> dict[str, list[str]]:
    """``set(NAME item item ...)`` blocks of a CMake file, ``${MODULE_NAME}`` expanded."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    blocks = {name: body.split() for name, body in re.findall(r"set\(\s*(\w+)\s+([^)]*)\)", text)}
    module_name = blocks.get("MODULE_NAME", [""])[0]
    return {name: [item.replace("${MODULE_NAME}", module_name) for item in items] for name, items in blocks.items()}


def test_every_widget_the_module_uses_is_in_the_ui_with_its_class(module_tree, ui_widgets):
    used = {
        node.attr
        for node in ast.walk(module_tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name)
        and node.value.value.id == "self"
    }
    assert used, "KneeBoneSeg.py uses no self.ui widgets"
    assert used <= set(EXPECTED_WIDGETS), f"widgets without an expected class: {used - set(EXPECTED_WIDGETS)}"
    for name in used:
        assert name in ui_widgets, f"self.ui.{name} is not in {UI_FILE.name}"
        assert ui_widgets[name].get("class") == EXPECTED_WIDGETS[name], name


def test_ui_parameters_are_fields_of_the_parameter_node(module_tree, ui_widgets):
    parameter_class = _class(module_tree, "KneeBoneSegParameterNode")
    assert any(getattr(decorator, "id", None) == "parameterNodeWrapper" for decorator in parameter_class.decorator_list)
    fields = {node.target.id: node.annotation for node in parameter_class.body if isinstance(node, ast.AnnAssign)}

    bound = {}
    for name, widget in ui_widgets.items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    assert bound, "no widget of the .ui is bound to the parameter node"
    for parameter, widget_class in bound.items():
        assert parameter in fields, f"the .ui binds '{parameter}', which KneeBoneSegParameterNode lacks"
        annotation = fields[parameter]
        base = annotation.slice.elts[0] if isinstance(annotation, ast.Subscript) else annotation
        assert widget_class in CONNECTABLE[ast.unparse(base)], f"{parameter}: {widget_class} cannot show {ast.unparse(base)}"


def test_parameter_choices_are_the_ones_the_library_accepts(module_tree):
    from KneeBoneSegLib.devices import DEVICE_CHOICES
    from KneeBoneSegLib.pipeline import CLOSING_UNITS, FUSIONS, SegmentOptions

    parameter_class = _class(module_tree, "KneeBoneSegParameterNode")
    fields = {node.target.id: node for node in parameter_class.body if isinstance(node, ast.AnnAssign)}

    def choices(name):
        (choice,) = [call for call in ast.walk(fields[name].annotation) if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Choice"]
        return set(ast.literal_eval(choice.args[0]))

    assert choices("fusion") == set(FUSIONS)
    assert choices("device") == set(DEVICE_CHOICES)
    defaults = SegmentOptions()
    assert ast.literal_eval(fields["fusion"].value) == defaults.fusion
    assert ast.literal_eval(fields["closingRadius"].value) == defaults.closing_radius
    assert ast.literal_eval(fields["closingUnits"].value) == defaults.closing_units
    assert choices("closingUnits") == set(CLOSING_UNITS)
    assert ast.literal_eval(fields["smoothingIterations"].value) == defaults.smoothing_iterations
    assert ast.literal_eval(fields["threeProjections"].value) == (defaults.projections == 3)


def test_command_line_options_the_module_passes_exist(module_tree):
    from KneeBoneSegLib.cli import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    accepted = {option for name in ("segment", "postprocess") for action in commands[name]._actions for option in action.option_strings}
    start = _method(_class(module_tree, "KneeBoneSegLogic"), "startSegmentation")
    strings = {node.value for node in ast.walk(start) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    passed = {text for text in strings if re.fullmatch(r"--[a-z][a-z-]*", text)}
    assert {"--progress", "--save-probability", "--closing-radius", "--closing-units"} <= passed
    assert passed <= accepted, f"options the command line does not know: {passed - accepted}"
    assert {"segment", "postprocess"} <= strings


def test_library_names_the_module_imports_exist(module_tree):
    imported = [
        (node.module, alias.name)
        for node in ast.walk(module_tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("KneeBoneSegLib")
        for alias in node.names
    ]
    assert imported
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"{module} has no {name}"


def test_logic_offers_the_documented_console_api(module_tree):
    logic = _class(module_tree, "KneeBoneSegLogic")
    assert [base.id for base in logic.bases] == ["ScriptedLoadableModuleLogic"]

    segment = _method(logic, "segment")
    arguments = [argument.arg for argument in segment.args.args]
    defaults = dict(zip(arguments[-len(segment.args.defaults) :], (ast.literal_eval(d) for d in segment.args.defaults)))
    assert arguments[:2] == ["self", "volumeNode"]
    from KneeBoneSegLib.pipeline import SegmentOptions

    library = SegmentOptions()
    assert (defaults["closingRadius"], defaults["closingUnits"]) == (library.closing_radius, library.closing_units)
    assert defaults["projections"] == 3
    assert ast.get_docstring(segment)

    export = _method(logic, "exportSTL")
    assert [argument.arg for argument in export.args.args] == ["self", "segmentationNode", "folder"]
    assert ast.get_docstring(export)

    for name, base in (("KneeBoneSeg", "ScriptedLoadableModule"), ("KneeBoneSegWidget", "ScriptedLoadableModuleWidget"), ("KneeBoneSegTest", "ScriptedLoadableModuleTest")):
        assert base in [getattr(b, "id", None) for b in _class(module_tree, name).bases]
    assert "runTest" in {node.name for node in _class(module_tree, "KneeBoneSegTest").body if isinstance(node, ast.FunctionDef)}


def test_module_cmake_lists_every_module_file():
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    scripts = set(lists["MODULE_PYTHON_SCRIPTS"])
    resources = set(lists["MODULE_PYTHON_RESOURCES"])
    on_disk_scripts = {path.relative_to(MODULE_DIR).as_posix() for path in MODULE_DIR.glob("*.py")}
    on_disk_resources = {path.relative_to(MODULE_DIR).as_posix() for path in (MODULE_DIR / "Resources").rglob("*") if path.is_file()}
    assert scripts == on_disk_scripts
    assert resources == on_disk_resources
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "NAME ${MODULE_NAME}" in text


def test_extension_cmake_packages_the_whole_library_and_the_shipped_model():
    from KneeBoneSegLib.models import SHIPPED_MODEL, card_path

    lists = _cmake_lists(ROOT / "CMakeLists.txt")
    library = set(lists["KneeBoneSegLib_PYTHON_SCRIPTS"])
    on_disk = {path.relative_to(ROOT).as_posix() for path in (ROOT / "KneeBoneSegLib").glob("*.py")}
    assert library == on_disk, f"missing from CMake: {on_disk - library}; listed but absent: {library - on_disk}"

    model = f"Resources/Models/{SHIPPED_MODEL}"
    assert set(lists["KneeBoneSegLib_PYTHON_RESOURCES"]) == {model, card_path(model).as_posix()}


def test_the_model_the_extension_ships_exists():
    for resource in _cmake_lists(ROOT / "CMakeLists.txt")["KneeBoneSegLib_PYTHON_RESOURCES"]:
        assert (ROOT / resource).is_file(), f"{resource} is packaged but does not exist (train the shipped model first)"


def test_extension_cmake_follows_the_slicer_template():
    text = (ROOT / "CMakeLists.txt").read_text()
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', text), f"EXTENSION_{variable} is not set"
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "NA")' in text
    ordered = [
        "project(KneeBoneSeg)",
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "ctkMacroCompilePythonScript(",
        "add_subdirectory(KneeBoneSeg)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.find(line) for line in ordered]
    assert -1 not in positions and positions == sorted(positions), dict(zip(ordered, positions))
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in text
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in text
    screenshot = re.search(r'set\(EXTENSION_SCREENSHOTURLS "[^"]*/main/([^"]+)"\)', text).group(1)
    icon = re.search(r'set\(EXTENSION_ICONURL "[^"]*/main/([^"]+)"\)', text).group(1)
    assert (ROOT / screenshot).is_file() and (ROOT / icon).is_file()


def test_icon_is_a_128_pixel_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "KneeBoneSeg.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (128, 128)


def test_pinned_requirements_are_the_tested_versions(module_tree):
    requirements = _constant(module_tree, "REQUIREMENTS")
    owned_by_slicer = {name.lower() for name in _constant(module_tree, "SLICER_OWNED_PACKAGES")}
    for import_name, requirement in requirements.items():
        assert importlib.util.find_spec(import_name) is not None, f"{import_name} is not importable here"
        distribution, pinned = requirement.split("==")
        assert distribution.lower() not in owned_by_slicer
        candidates = [distribution] + ([f"{distribution}-cpu"] if distribution == "tensorflow" else [])
        installed = []
        for candidate in candidates:
            try:
                installed.append(version(candidate))
            except PackageNotFoundError:
                continue
        assert pinned in installed, f"{requirement}: the tests run with {installed or 'nothing'}"


@pytest.mark.sample
def test_sample_checksums_match_the_sample_files(module_tree, sample_dir):
    files = _constant(module_tree, "SAMPLE_FILES")
    for name, checksum in files.items():
        algorithm, digest = checksum.split(":")
        assert algorithm == "SHA256"
        assert hashlib.sha256((sample_dir / name).read_bytes()).hexdigest() == digest, name


def test_slicer_docs_show_what_exists(module_tree):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / image).is_file(), image
    logic_methods = {node.name for node in _class(module_tree, "KneeBoneSegLogic").body if isinstance(node, ast.FunctionDef)}
    called = set(re.findall(r"\blogic\.(\w+)\(", text))
    assert {"segment", "exportSTL"} <= called <= logic_methods
    assert 'getModuleLogic("KneeBoneSeg")' in text and "--python-code" in text
