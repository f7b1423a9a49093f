#!/usr/bin/env python3
"""Regenerates rust-book.jsonl: the prose of "The Rust Programming Language" (Steve Klabnik,
Carol Nichols and contributors; Apache-2.0 OR MIT) as shipped in HTML with the Rust toolchain's
documentation (`rustup component add rust-docs`). One JSON line {"text": ...} per section of chapters 1 to 8:
its heading and paragraphs, without code listings. Usage: make_corpus.py BOOK_HTML_DIR > rust-book.jsonl
"""
import html
import json
import pathlib
import re
import sys


def sections(page: str):
    main = page.split("<main>", 1)[-1].split("</main>", 1)[0]
    main = re.sub(r"<pre>.*?</pre>", "", main, flags=re.S)
    title, paragraphs = None, []
    for tag, body in re.findall(r"<(h[1-3]|p|li)\b[^>]*>(.*?)</\1>", main, flags=re.S):
        text = html.unescape(re.sub(r"<[^>]+>", "", body))
        text = re.sub(r"\s+", " ", text).strip()
        if not text:
            continue
        if tag.startswith("h"):
            if paragraphs:
                yield "\n\n".join(([title] if title else []) + paragraphs)
            title, paragraphs = text, []
        else:
            paragraphs.append(text)
    if paragraphs:
        yield "\n\n".join(([title] if title else []) + paragraphs)


def main():
    book = pathlib.Path(sys.argv[1])
    for path in sorted(book.glob("ch0[0-8]-[0-9][0-9]-*.html")):
        for section in sections(path.read_text(encoding="utf-8")):
            if len(section) > 200:
                print(json.dumps({"text": section}, ensure_ascii=False))


if __name__ == "__main__":
    main()
