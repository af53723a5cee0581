"""The Slicer extension's files agree with each other and with the library.

KneeBoneSeg.py needs the Slicer application (qt, ctk, slicer.util) to import,
so it is read as a syntax tree here; the .ui file as XML; the CMake lists as text.
"""

from __future__ import annotations

import ast
import importlib
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "KneeBoneSeg"
MODULE_SOURCE = MODULE_DIR / "KneeBoneSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "KneeBoneSeg.ui"

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


def _cmake_lists(path: Path) -> dict[str, list[str]]:
    """``set(NAME item item ...)`` blocks of a CMake file, ``${MODULE_NAME}`` expanded."""
    text = re.sub(r"#[^\n]*", "", path.read_text())
    blocks = {name: body.split() for name, body in re.findall(r"set\(\s*(\w+)\s+([^)]*)\)", text)}
    module_name = blocks.get("MODULE_NAME", [""])[0]
    return {name: [item.replace("${MODULE_NAME}", module_name) for item in items] for name, items in blocks.items()}


def test_every_widget_the_module_uses_is_in_the_ui(module_tree, ui_widgets):
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
    assert used <= set(ui_widgets), f"self.ui widgets missing from {UI_FILE.name}: {sorted(used - set(ui_widgets))}"


def test_ui_widgets_show_parameters_of_the_parameter_node(ui_widgets):
    """The module builds its parameter node from the library's panel_parameters(); the .ui binds widgets to them."""
    from KneeBoneSegLib.slicer.panel import panel_parameters

    kinds = {parameter.name: parameter.kind.__name__ for parameter in panel_parameters()}
    kinds.update(inputVolume="vtkMRMLScalarVolumeNode", outputSegmentation="vtkMRMLSegmentationNode")
    bound = {}
    for widget in ui_widgets.values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    for parameter, widget_class in bound.items():
        assert parameter in kinds, f"the .ui binds '{parameter}', which the parameter node lacks"
        assert widget_class in CONNECTABLE[kinds[parameter]], (
            f"{parameter}: {widget_class} cannot show {kinds[parameter]}"
        )
    # Every parameter is shown; the model path's widget is set by the panel (a ctkPathLineEdit has no connector).
    assert set(kinds) - set(bound) == {"model"}


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

    # Every option of the library by its name (options_from_mapping refuses others).
    segment = _method(logic, "segment")
    assert [argument.arg for argument in segment.args.args] == [
        "self",
        "volumeNode",
        "segmentationNode",
    ] and segment.args.kwarg.arg == "options"
    assert "options_from_mapping" in _calls(segment) and ast.get_docstring(segment)

    export = _method(logic, "exportSTL")
    assert [argument.arg for argument in export.args.args] == ["self", "segmentationNode", "folder"]
    assert ast.get_docstring(export)

    for name, base in (
        ("KneeBoneSeg", "ScriptedLoadableModule"),
        ("KneeBoneSegWidget", "ScriptedLoadableModuleWidget"),
        ("KneeBoneSegTest", "ScriptedLoadableModuleTest"),
    ):
        assert base in [getattr(b, "id", None) for b in _class(module_tree, name).bases]
    assert "runTest" in {
        node.name for node in _class(module_tree, "KneeBoneSegTest").body if isinstance(node, ast.FunctionDef)
    }


def test_module_cmake_lists_every_module_file():
    lists = _cmake_lists(MODULE_DIR / "CMakeLists.txt")
    scripts = set(lists["MODULE_PYTHON_SCRIPTS"])
    resources = set(lists["MODULE_PYTHON_RESOURCES"])
    on_disk_scripts = {path.relative_to(MODULE_DIR).as_posix() for path in MODULE_DIR.glob("*.py")}
    on_disk_resources = {
        path.relative_to(MODULE_DIR).as_posix() for path in (MODULE_DIR / "Resources").rglob("*") if path.is_file()
    }
    assert scripts == on_disk_scripts
    assert resources == on_disk_resources
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text and "NAME ${MODULE_NAME}" in text


def test_extension_cmake_packages_the_whole_library_and_the_shipped_model():
    from KneeBoneSegLib.network.models import SHIPPED_MODEL, card_path

    lists = _cmake_lists(ROOT / "CMakeLists.txt")
    library = set(lists["KneeBoneSegLib_PYTHON_SCRIPTS"])
    on_disk = {path.relative_to(ROOT).as_posix() for path in (ROOT / "KneeBoneSegLib").rglob("*.py")}
    assert library == on_disk, f"missing from CMake: {on_disk - library}; listed but absent: {library - on_disk}"

    model = f"Resources/Models/{SHIPPED_MODEL}"
    resources = set(lists["KneeBoneSegLib_PYTHON_RESOURCES"])
    assert {model, card_path(model).as_posix()} <= resources
    # Every packaged network (the default and the ones shipped as a choice) comes with its card, and only networks do.
    networks = {resource for resource in resources if resource.endswith(".onnx")}
    assert resources == networks | {card_path(network).as_posix() for network in networks}


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


def test_slicer_docs_show_what_exists(module_tree):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (ROOT / image).is_file(), image
    logic_methods = {
        node.name for node in _class(module_tree, "KneeBoneSegLogic").body if isinstance(node, ast.FunctionDef)
    }
    called = set(re.findall(r"\blogic\.(\w+)\(", text))
    assert {"segment", "exportSTL"} <= called <= logic_methods
    assert 'getModuleLogic("KneeBoneSeg")' in text
    assert "--python-code" in (ROOT / "docs" / "slicer.md").read_text(encoding="utf-8"), (
        "say how to run the self-test without the main window"
    )


# The widget needs the Slicer application, so what it decides lives in the
# library and is tested there: the panel's state in test_slicer_panel.py, the
# first-use install in test_slicer_environment.py, the runs, reuse and clean-up
# in test_slicer_logic.py, the worker and Cancel in test_worker.py, surfaces,
# reference geometry and terminology in test_mrml.py. Here only the wiring is
# read from the source: which library call each of the panel's events makes.


def _dotted(node: ast.AST) -> str:
    """``self.logic.close`` for the function of a call or an attribute chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call):
        parts.append(_dotted(node.func) + "()")
    return ".".join(reversed(parts))


def _calls(tree: ast.AST) -> list[str]:
    return [_dotted(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _assigned(tree: ast.AST) -> list[tuple[str, object]]:
    """``(target, value)`` of the assignments in ``tree``, values as literals where they are."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                value = node.value.value if isinstance(node.value, ast.Constant) else ast.unparse(node.value)
                found.append((_dotted(target), value))
    return found


def test_each_panel_event_goes_to_the_library_call_that_decides_it(module_tree):
    widget, logic = _class(module_tree, "KneeBoneSegWidget"), _class(module_tree, "KneeBoneSegLogic")
    wiring = {
        (widget, "setup"): {"ParameterGuiBinding", "parameter_widgets"},
        (widget, "setParameterNode"): {"self._guiBinding.bind"},
        (widget, "cleanup"): {"self._guiBinding.unbind", "self.logic.close"},
        (widget, "updateButtons"): {"panel_state", "device_description"},
        (widget, "onSegmentButton"): {"self.confirmReplacingEdits"},
        (widget, "confirmReplacingEdits"): {"edited_since_written", "slicer.util.confirmOkCancelDisplay"},
        (widget, "onReapplyPostprocessing"): {"self.logic.reappliesPostprocessing", "self.onSegmentButton"},
        (widget, "ensureRequirements"): {"ensure_requirements"},
        (widget, "onCancelButton"): {"self.logic.cancelRun"},
        (widget, "onPollRun"): {"self._run.worker.poll", "self.logic.finishRun"},
        (widget, "onSceneStartClose"): {"self.logic.discardKeptOutput"},
        (widget, "onBatchRunButton"): {"self.logic.startBatch", "panel_options"},
        (widget, "onPollBatch"): {"finish_batch", "self.ui.batchTableView.setMRMLTableNode"},
        (widget, "onBatchCaseClicked"): {"load_case"},
        (widget, "onBatchCancelButton"): {"self._batch.cancel"},
        (logic, "startBatch"): {"batch_folders", "self.runs.start_batch"},
        (logic, "reappliesPostprocessing"): {"self._runs.reapplies"},
        (logic, "runs"): {"backgroundRuns"},
        (logic, "segment"): {"requirement_problems"},
    }
    for (cls, name), calls in wiring.items():
        assert calls <= set(_calls(_method(cls, name))), f"{cls.name}.{name} must call {calls}"
    # A run's results go to the nodes it started with, never to what the selectors show when it ends.
    finish = [
        node
        for node in ast.walk(_method(widget, "onPollRun"))
        if isinstance(node, ast.Call) and _dotted(node.func) == "self.logic.finishRun"
    ]
    assert [ast.unparse(call) for call in finish] == ["self.logic.finishRun(run)"]
    # The widgets are bound once per parameter node (KneeBoneSegLib.slicer.gui), never by connectGui, whose tag
    # Slicer 5.6 and 5.8 do not return; re-apply follows the signals the library names (no combo box refill).
    source = MODULE_SOURCE.read_text(encoding="utf-8")
    assert "connectGui(" not in source and "disconnectGui(" not in source
    assert "getattr(self.ui, name).connect(signal, self.onPostprocessingSettingChanged)" in ast.unparse(
        _method(widget, "setup")
    )
    assert "onPostprocessingSettingChanged" not in re.sub(
        r"getattr\(self\.ui, name\)\.connect\(signal, self\.onPostprocessingSettingChanged\)|def onPostprocessingSettingChanged",
        "",
        source,
    )
    # Work is polled from a Qt timer: a reader thread starves under PythonQt.
    assert "threading" not in MODULE_SOURCE.read_text(encoding="utf-8")
    assert 'slicer.app.connect("aboutToQuit()", self.close)' in ast.unparse(_method(logic, "__init__")).replace(
        "'", '"'
    )


def test_self_test_without_the_sample_passes_and_says_so(module_tree):
    assert "skipTest" not in MODULE_SOURCE.read_text(encoding="utf-8") and "SkipTest" not in MODULE_SOURCE.read_text(
        encoding="utf-8"
    )
    run_test = _method(_class(module_tree, "KneeBoneSegTest"), "runTest")
    first = run_test.body[0]
    assert isinstance(first, ast.If) and ast.unparse(first.test) == "sampleDataFolder() is None"
    assert isinstance(first.body[-1], ast.Return)
    assert "self.delayDisplay" in _calls(first)


def test_stl_export_starts_in_a_real_folder_and_remembers_it(module_tree):
    widget = _class(module_tree, "KneeBoneSegWidget")
    assert ("self.ui.exportDirectoryButton.directory", "str(self.logic.defaultExportFolder())") in _assigned(
        _method(widget, "setup")
    )
    export = ast.unparse(_method(widget, "onExportSTLButton"))
    assert "qt.QSettings().setValue(EXPORT_FOLDER_SETTING, folder)" in export
    assert "export_folder" in _calls(_method(_class(module_tree, "KneeBoneSegLogic"), "defaultExportFolder"))


def test_the_terminology_the_segments_name_is_shipped_and_loaded(module_tree):
    from KneeBoneSegLib.io.outputs import SLICER_TERMINOLOGY_CONTEXT

    source = MODULE_SOURCE.read_text(encoding="utf-8")
    (name,) = re.findall(r'"(SegmentationCategoryType-[\w-]+\.term\.json)"', source)
    path = MODULE_DIR / "Resources" / "Terminologies" / name
    assert f"Resources/Terminologies/{name}" in _cmake_lists(MODULE_DIR / "CMakeLists.txt")["MODULE_PYTHON_RESOURCES"]
    import json

    assert (
        json.loads(path.read_text(encoding="utf-8"))["SegmentationCategoryTypeContextName"]
        == SLICER_TERMINOLOGY_CONTEXT
    )
    assert 'slicer.app.connect("startupCompleted()", loadTerminology)' in source
    assert "loadTerminology" in _calls(_method(_class(module_tree, "KneeBoneSegWidget"), "setup"))


def test_extensions_index_reads_literal_urls_and_a_matching_licence():
    text = (ROOT / "CMakeLists.txt").read_text()
    for variable in ("HOMEPAGE", "ICONURL", "SCREENSHOTURLS"):
        (value,) = re.findall(rf'set\(EXTENSION_{variable} "([^"]*)"\)', text)
        assert re.fullmatch(r"https://[^\s${}]+", value), (
            f"EXTENSION_{variable} must be a literal https:// URL, not {value!r}"
        )
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    declared = re.search(r'license = \{ text = "([^"]+)" \}', (ROOT / "pyproject.toml").read_text()).group(1)
    assert declared == "Apache-2.0"
    assert "Apache License" in licence.splitlines()[0] and "Version 2.0, January 2004" in licence
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in licence
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Slicer" in readme and re.search(r"Extensions Index.*?prefix|prefix.*?Extensions Index", readme, re.S), (
        "say how the repository name meets the index's naming rule"
    )


def test_sample_data_assembles_the_public_dataset_with_the_library_command(module_tree):
    register = next(
        node for node in module_tree.body if isinstance(node, ast.FunctionDef) and node.name == "registerSampleData"
    )
    assert "sample_data_source" in _calls(register) and "customDownloader=loadSampleScan" in ast.unparse(register)
    load = next(
        node for node in module_tree.body if isinstance(node, ast.FunctionDef) and node.name == "loadSampleScan"
    )
    assert "backgroundRuns().assemble_sample" in _calls(
        load
    )  # the library's worker helper, tested in test_slicer_logic
