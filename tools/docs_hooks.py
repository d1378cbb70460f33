"""MkDocs hook (mkdocs.yml ``hooks:``): adds the configuration reference, generated from the config
schema (:mod:`spactor_mega.plan.config_reference`), to the site's pages, so that it cannot drift from
``spactor_mega/config.py``."""

from mkdocs.structure.files import File

from spactor_mega.plan.config_reference import render_markdown

REFERENCE_PAGE = "reference/configuration.md"


def on_files(files, config):
    files.append(File.generated(config, REFERENCE_PAGE, content=render_markdown()))
    return files
