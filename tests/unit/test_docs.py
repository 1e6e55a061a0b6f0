"""The README and docs/ point at things that exist: relative links, shipped configs, make targets."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_config_paths_exist(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
            missing.append(target)
    for config in set(re.findall(r"(?<![\w/.-])((?:benchmarks/)?configs/[\w/.-]+\.yaml)\b", text)):
        if not (ROOT / config).is_file():
            missing.append(config)
    for script in set(re.findall(r"(?<![\w/.-])((?:benchmarks|scripts)/[\w/.-]+\.(?:py|sh))\b", text)):
        if not (ROOT / script).is_file():
            missing.append(script)
    assert not missing, f"{page.name} points at what does not exist: {missing}"


def test_readme_fits_on_a_page_and_names_its_make_targets():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    targets = set(re.findall(r"^([a-z0-9-]+):.*## ", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    assert {"demo", "test"} <= targets
    for target in re.findall(r"`make ([a-z0-9-]+)", readme):
        assert target in targets, f"README names make {target}, which the Makefile lacks"
