"""Write the synthetic ViGGO-layout task shipped with lotaqaf (lotaqaf_cli/data/shipped/viggo_synth-*.jsonl).

    python scripts/make_viggo_synth.py            # rewrites both files; deterministic (seeded)
    python scripts/make_viggo_synth.py --out DIR  # elsewhere (tests/test_tasks.py compares with the shipped files)

SYNTHETIC DATA, made here from templates: invented games, studios and sentences, written in GEM/viggo's
layout ({gem_id, meaning_representation, target, references}) with ViGGO's nine dialogue acts and its
attribute names, so that the task-specific half of Table 1 can run on a machine without the hub. It is
not ViGGO and its numbers are not comparable with the paper's ViGGO column. Train and test use disjoint
game names, so the test asks the model to copy names it never saw in training.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "lotaqaf_cli" / "data" / "shipped"
N_TRAIN, N_TEST, SEED = 1024, 100, 20261205

FIRST = ["Iron", "Crystal", "Shadow", "Solar", "Hollow", "Crimson", "Silent", "Frozen", "Neon", "Ancient", "Wild",
         "Broken", "Golden", "Lunar", "Savage", "Hidden", "Electric", "Twisted", "Velvet", "Stone", "Cosmic",
         "Rusty", "Emerald", "Thunder", "Pixel", "Scarlet", "Phantom", "Copper", "Midnight", "Echo"]
SECOND = ["Tactics", "Legends", "Rising", "Frontier", "Odyssey", "Arena", "Kingdom", "Drift", "Protocol", "Harbor",
          "Chronicles", "Siege", "Garden", "Circuit", "Voyage", "Rebellion", "Dungeon", "Empire", "Racers", "Quest",
          "Outpost", "Horizon", "Mayhem", "Station", "Saga", "Hunters", "Descent", "Academy", "Valley", "Storm"]
DEVELOPERS = ["Bluefin Studios", "Northlight Games", "Paper Lantern", "Ironwood Interactive", "Small Moon",
              "Red Kite Software", "Quartz Works", "Tidepool Games", "Oakshade", "Greyhound Digital"]
GENRES = ["action", "adventure", "puzzle", "role-playing", "shooter", "strategy", "simulation", "sport",
          "driving/racing", "platformer", "fighting", "indie"]
PLATFORMS = ["PC", "PlayStation", "Xbox", "Nintendo Switch"]
ESRB = ["E (for Everyone)", "E 10+ (for Everyone 10 and Older)", "T (for Teen)", "M (for Mature)"]
RATINGS = ["poor", "average", "good", "excellent"]
PERSPECTIVES = ["first person", "third person", "side view", "bird view"]
SPECIFIERS = ["exciting", "relaxing", "challenging", "underrated", "popular"]
YES_NO = ["yes", "no"]


def _names(rng: random.Random) -> list[str]:
    names = [f"{a} {b}" for a in FIRST for b in SECOND]
    rng.shuffle(names)
    return names


def _listing(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def _pick(rng, pool, k_max):
    return rng.sample(pool, rng.randint(1, k_max))


# one phrase per attribute, several wordings each; {v} is the value as written in the sentence
PHRASES = {
    "release_year": ["released in {v}", "from {v}", "that came out in {v}"],
    "developer": ["made by {v}", "developed by {v}", "from the studio {v}"],
    "esrb": ["rated {v}", "with an ESRB rating of {v}"],
    "genres": ["a {v} game", "in the {v} genre"],
    "platforms": ["on {v}", "playable on {v}", "available for {v}"],
    "player_perspective": ["played from a {v} perspective", "with a {v} camera"],
}
FLAGS = {"available_on_steam": ("on Steam", "Steam"), "has_linux_release": ("on Linux", "Linux"),
         "has_mac_release": ("on Mac", "Mac")}


def _value_text(attr: str, v) -> str:
    return _listing(v) if isinstance(v, list) else str(v)


def _mr(fn: str, attrs: list[tuple[str, object]]) -> str:
    inner = ", ".join(f"{a}[{', '.join(v) if isinstance(v, list) else v}]" for a, v in attrs)
    return f"{fn}({inner})"


def _value(rng, attr):
    return {"release_year": lambda: str(rng.randint(1995, 2024)), "developer": lambda: rng.choice(DEVELOPERS),
            "esrb": lambda: rng.choice(ESRB), "genres": lambda: _pick(rng, GENRES, 2),
            "platforms": lambda: _pick(rng, PLATFORMS, 3), "player_perspective": lambda: rng.choice(PERSPECTIVES),
            "rating": lambda: rng.choice(RATINGS), "specifier": lambda: rng.choice(SPECIFIERS)}.get(
        attr, lambda: rng.choice(YES_NO))()


def _clauses(rng, attrs):
    out = []
    for a, v in attrs:
        if a in PHRASES:
            out.append(rng.choice(PHRASES[a]).format(v=_value_text(a, v)))
    return out


def _flags_sentence(rng, name, flags):
    yes = [FLAGS[a][1] for a, v in flags if v == "yes"]
    no = [FLAGS[a][1] for a, v in flags if v == "no"]
    parts = []
    if yes:
        parts.append(f"you can get it on {_listing(yes)}")
    if no:
        parts.append(f"it is not available on {_listing(no)}")
    return rng.choice([f"{name.split()[0]} fans should know that ", "Note that "]) + " but ".join(parts) + "."


def example(rng: random.Random, name: str) -> tuple[str, str]:
    """(meaning representation, sentence) of one utterance about the game ``name``."""
    fn = rng.choice(["inform", "inform", "give_opinion", "confirm", "suggest", "verify_attribute", "recommend",
                     "request", "request_attribute", "request_explanation"])
    core = ["release_year", "developer", "esrb", "genres", "platforms", "player_perspective"]
    if fn == "inform":
        chosen = rng.sample(core, rng.randint(2, 4))
        flags = rng.sample(list(FLAGS), rng.randint(0, 2))
        attrs = [("name", name)] + [(a, _value(rng, a)) for a in chosen] + [(a, _value(rng, a)) for a in flags]
        cl = _clauses(rng, attrs)
        text = f"{name} is " + ", ".join(cl[:-1]) + (" and " if len(cl) > 1 else "") + cl[-1] + "."
        if flags:
            text += " " + _flags_sentence(rng, name, [(a, v) for a, v in attrs if a in FLAGS])
        return _mr(fn, attrs), text
    if fn == "give_opinion":
        extra = rng.choice(["genres", "player_perspective", "developer"])
        attrs = [("name", name), ("rating", _value(rng, "rating")), (extra, _value(rng, extra))]
        text = rng.choice(["I think {n} is {r}, {c}.", "In my opinion {n} is an {r} game, {c}.",
                           "{n}? I found it {r}, {c}."]).format(n=name, r=attrs[1][1], c=_clauses(rng, attrs[2:])[0])
        return _mr(fn, attrs), text
    if fn in ("confirm", "suggest", "recommend"):
        extra = rng.choice(core)
        attrs = [("name", name), (extra, _value(rng, extra))]
        c = _clauses(rng, attrs[1:])[0]
        text = {"confirm": f"So you mean {name}, the one {c}?",
                "suggest": f"Do you also like {name}? It is {c}.",
                "recommend": f"You should try {name}, it is {c}."}[fn]
        return _mr(fn, attrs), text
    if fn == "verify_attribute":
        extra = rng.choice(["genres", "player_perspective", "platforms"])
        attrs = [("name", name), ("rating", _value(rng, "rating")), (extra, _value(rng, extra))]
        text = (f"You said {name} was {attrs[1][1]}. Do you usually enjoy games "
                f"{_clauses(rng, attrs[2:])[0].replace('a ', '', 1)}?")
        return _mr(fn, attrs), text
    if fn == "request":
        extra = rng.choice(["genres", "platforms", "release_year"])
        attrs = [("specifier", _value(rng, "specifier")), (extra, _value(rng, extra))]
        text = f"Have you played any {attrs[0][1]} games {_clauses(rng, attrs[1:])[0]}?"
        return _mr(fn, attrs), text
    if fn == "request_attribute":
        a = rng.choice(["genres", "platforms", "player_perspective", "developer"])
        q = {"genres": "What kind of games do you like to play?", "platforms": "Which platform do you play on most?",
             "player_perspective": "Do you prefer a first person or a third person view?",
             "developer": "Is there a studio whose games you always buy?"}[a]
        return f"request_attribute({a}[])", q
    extra = rng.choice(["genres", "player_perspective"])
    attrs = [("rating", _value(rng, "rating")), (extra, _value(rng, extra))]
    text = f"What makes games {_clauses(rng, attrs[1:])[0].replace('a ', '', 1)} {attrs[0][1]} for you?"
    return _mr("request_explanation", attrs), text


def rows(split: str, n: int, names: list[str], seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:{split}")
    out = []
    for i in range(n):
        mr, text = example(rng, names[i % len(names)])
        out.append({"gem_id": f"viggo_synth-{split}-{i}", "meaning_representation": mr, "target": text,
                    "references": [text]})
    return out


def write(out_dir: Path) -> list[Path]:
    names = _names(random.Random(SEED))
    test_names, train_names = names[:N_TEST], names[N_TEST:]
    paths = []
    for split, n, pool in (("train", N_TRAIN, train_names), ("test", N_TEST, test_names)):
        path = Path(out_dir) / f"viggo_synth-{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows(split, n, pool, SEED)), encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(OUT), help="output folder (default: lotaqaf_cli/data/shipped)")
    for path in write(Path(p.parse_args(argv).out)):
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
