"""A comparison's figures and its two reports (self-contained HTML, Markdown beside figures/).

`figures` draws and writes every figure, `content` holds what both reports say (models,
summary, files), `html` and `markdown` render it. Import the submodules by full path.
"""
