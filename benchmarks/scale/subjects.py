"""Generated subjects (people, products, places) and prompts about them, for the scale benchmark.

Deterministic: the same `n` always gives the same subjects in the same order.
"""

from __future__ import annotations

import itertools
import random

FIRST = ("Anna Ben Clara David Elena Felix Greta Hugo Ines Jonas Karin Lukas Maria Nils Olga Paul Rosa Simon "
         "Tara Umar Vera Walter Xenia Yusuf Zoe Amir Bianca Carlos Dana Emil Farah Goran Hana Ivan Julia Kofi "
         "Lena Marco Nadia Oscar Petra Quentin Rahel Stefan Tomas Ulla Viktor Wanda Yara Zeno").split()
LAST = ("Adler Berger Castillo Dimitrov Eriksen Fischer Garcia Horvat Ivanova Jensen Kowalski Lindqvist Moreau "
        "Novak Okafor Petrov Quint Rossi Schmidt Tanaka Ueda Varga Weber Xu Yilmaz Zimmermann Alvarez Brandt "
        "Costa Dubois Engel Fontaine Gruber Hansen Ito Jovanovic Keller Larsen Meier Nakamura").split()
INITIALS = [f"{c}." for c in "ABCDEFGHJKLMNPRSTVW"]
BRANDS = ("Altura Boreal Cobalt Dynamo Ember Fjord Granite Helix Iris Juniper Kestrel Lumen Meridian Nimbus "
          "Onyx Pioneer Quasar Raven Sierra Tundra").split()
PRODUCTS = ("Phone Tablet Router Camera Drone Speaker Watch Laptop Monitor Printer Scooter Blender Kettle "
            "Headset Keyboard").split()
PLACE_A = ("North South East West New Old Upper Lower Great Little Port Lake Mount Fort Saint").split()
PLACE_B = ("Arden Belmont Carrow Dunmore Elsworth Fairhaven Glenrock Harwick Ivybridge Kingsley Larkfield "
           "Marlow Northam Oakridge Pembury Quarry Redcliff Stanmore Thornbury Upton Westbury Yarrow").split()


def subjects(n: int, seed: int = 0) -> list[str]:
    """`n` distinct subjects: 1/8 products ("Nimbus Drone 12"), 1/50 places ("Port Marlow Bay"),
    the rest people ("Anna K. Weber", "Anna Rosa Weber")."""
    people = [f"{f} {i} {l}" for f, i, l in itertools.product(FIRST, INITIALS, LAST)]
    people += [f"{f} {m} {l}" for f, m, l in itertools.product(FIRST, FIRST, LAST) if f != m]
    products = [f"{b} {p} {k}" for b, p, k in itertools.product(BRANDS, PRODUCTS, range(1, 60))]
    places = [f"{a} {b}" for a, b in itertools.product(PLACE_A, PLACE_B)]
    places += [f"{a} {b} {s}" for a, b, s in itertools.product(
        PLACE_A, PLACE_B, ("Bay", "Falls", "Springs", "Heights", "Valley"))]
    people, products, places = (sorted(set(pool)) for pool in (people, products, places))
    rng = random.Random(seed)
    for pool in (people, products, places):
        rng.shuffle(pool)
    n_prod, n_place = min(n // 8, len(products)), min(n // 50, len(places))
    picked = products[:n_prod] + places[:n_place] + people[: n - n_prod - n_place]
    if len(picked) < n or len(set(picked)) != len(picked):
        raise ValueError(f"cannot generate {n} distinct subjects (have {len(set(picked))})")
    rng.shuffle(picked)
    return picked


EDIT_TEMPLATES = ("{} was born in", "{} is located in", "The headquarters of {} are in", "{} is made by")
PARAPHRASE_TEMPLATES = ("Yesterday I read a long article. {} is best known for",
                        "Many people ask about {}. The answer is that {} comes from",
                        "In the news today: {} has announced that")
