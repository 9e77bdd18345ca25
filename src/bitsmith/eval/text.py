"""Real English text that installs offline (shipped by gensim's test data)."""
from __future__ import annotations

import bz2
import html
import importlib.util
import re
from pathlib import Path

from ..errors import BitsmithError


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise BitsmithError("gensim is not installed: pip install gensim==4.4.0 (its test data is our text)")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def lee_corpus_path() -> Path:
    """The Lee background corpus: 300 news paragraphs, one per line."""
    return _gensim_test_data() / "lee_background.cor"


def lee_corpus_text() -> str:
    return lee_corpus_path().read_text(encoding="utf-8")


def wiki_text() -> str:
    """Plain text from gensim's shortened Wikipedia dump, extracted reproducibly: each
    ``<text>`` element, unescaped, with templates, tables, refs, links and markup stripped,
    articles separated by blank lines."""
    path = next(_gensim_test_data().glob("enwiki-latest-pages-articles1.xml-*-shortened.bz2"))
    xml = bz2.open(path, "rt", encoding="utf-8").read()
    articles = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S):
        t = html.unescape(body)
        for _ in range(3):  # nested templates
            t = re.sub(r"\{\{[^{}]*\}\}", "", t)
        t = re.sub(r"\{\|.*?\|\}", "", t, flags=re.S)
        t = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", t, flags=re.S)
        t = re.sub(r"<[^>]+>", "", t)
        t = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", t)
        t = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", t)
        t = re.sub(r"'{2,}", "", t)
        t = re.sub(r"^[=*#:;|!].*$", "", t, flags=re.M)
        t = re.sub(r"\n{3,}", "\n\n", t).strip()
        if len(t) > 200 and not t.lower().startswith("#redirect"):
            articles.append(t)
    if not articles:
        raise BitsmithError("no article text found", file=str(path))
    return "\n\n".join(articles)
