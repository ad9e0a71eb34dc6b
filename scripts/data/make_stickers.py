"""The project's open sticker set, in SER30K's layout, from the emoji of
Debian's ruby-gemojione package (Emoji One artwork, CC-BY-SA-4.0, (c) 2014
Ranks.com Inc.; index by Jonathan Wiesel, MIT).

    python make_stickers.py GEMOJIONE.deb OUT_DIR

OUT_DIR gets
  Images/<category>/<code>.png                 64x64 RGBA emoji, one folder per category (theme)
  Annotations/image-level/{train,val,test}.json  {"annotations": [{"topic", "file_name", "text", "keywords"}]}
  ATTRIBUTION.md                               licence and attribution, shipped with any copy

Themes are gemojione's categories with at least 40 emoji (people, symbols,
flags, objects, nature, activity, travel, food); skin-tone variants
(codes with 1F3FB-1F3FF) are left out so a theme is not one face five
times. An item's text is its name and keywords. The split into train / val /
test files is 80/10/10 by a fixed hash of the code (SER30K ships three).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

deb, out = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp()
subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
gem = os.path.join(tmp, "usr/share/rubygems-integration/all/gems/gemojione-3.3.0")
index = json.load(open(os.path.join(gem, "config/index.json"), encoding="utf-8"))

TONES = ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")
by_cat = {}
for e in index.values():
    code = e["unicode"]
    if any(t in code.split("-") for t in TONES):
        continue
    by_cat.setdefault(e["category"], []).append(e)
themes = {c: v for c, v in by_cat.items() if len(v) >= 40}

if os.path.exists(out):
    shutil.rmtree(out)
parts = {"train": [], "val": [], "test": []}
for cat, emoji in sorted(themes.items()):
    os.makedirs(os.path.join(out, "Images", cat), exist_ok=True)
    for e in sorted(emoji, key=lambda e: e["unicode"]):
        src = os.path.join(gem, "assets/png", e["unicode"].upper() + ".png")
        if not os.path.exists(src):
            continue
        name = e["unicode"].upper() + ".png"
        shutil.copyfile(src, os.path.join(out, "Images", cat, name))
        words = [k for k in e.get("keywords", []) if k and k != "a"]
        text = e["name"] + (". " + ", ".join(words) if words else "")
        h = int(hashlib.sha256(e["unicode"].encode()).hexdigest(), 16) % 10
        part = "test" if h == 0 else "val" if h == 1 else "train"
        parts[part].append({"topic": cat, "file_name": name, "text": text, "keywords": words})
os.makedirs(os.path.join(out, "Annotations/image-level"), exist_ok=True)
for part, ann in parts.items():
    with open(os.path.join(out, f"Annotations/image-level/{part}.json"), "w", encoding="utf-8") as f:
        json.dump({"annotations": ann}, f, ensure_ascii=False, indent=0)
with open(os.path.join(out, "ATTRIBUTION.md"), "w", encoding="utf-8") as f:
    f.write(
        "# Sticker images\n\n"
        "Emoji artwork by Emoji One (c) 2014 Ranks.com Inc., licensed under the Creative\n"
        "Commons Attribution-ShareAlike 4.0 International licence\n"
        "(https://creativecommons.org/licenses/by-sa/4.0/). Names, categories and\n"
        "keywords from the gemojione index (c) 2013 Jonathan Wiesel, MIT licence.\n"
        "Taken from Debian's ruby-gemojione 3.3.0-1 package; rearranged into SER30K's\n"
        "folder layout by ragar's scripts/data/make_stickers.py (no pixels changed).\n"
    )
shutil.rmtree(tmp)
n = sum(len(v) for v in parts.values())
print(f"{n} stickers in {len(themes)} themes -> {out}")
