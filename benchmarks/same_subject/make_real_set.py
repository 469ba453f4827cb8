"""The real-model same-subject set (issue 13): real subjects with several facts each, checked
against SmolLM2-135M-Instruct.

    NKV_CACHE=<model cache> python benchmarks/same_subject/make_real_set.py

The candidates below are written by hand from public knowledge: subjects of ten kinds
(countries, cities, US cities, landmarks, people, writers, books, paintings, companies,
products), the relations of each kind with two or three prompt phrasings (each ends right
before the answer), and per (subject, relation) the true answer (with accepted aliases:
"yen" or "Japanese yen") and an obviously counterfactual answer of the same type.

Each phrasing is checked with the model: greedy decoding (nkv.editing.generation), and the
prompt is "answered correctly" when the continuation, stripped, starts with one of the
answers (case-insensitive) followed by a non-alphanumeric character or the end ("Paris,"
counts, "Parisian" does not). The alias it starts with becomes that prompt's target.
A (subject, relation) pair is kept when at least one phrasing is answered correctly; a
subject is kept when at least two of its relations are.

Outputs (examples/smollm2/, in NKV's facts schema like examples/factworld/):
  same_subject_true.jsonl   every correctly answered (subject, relation, prompt, target)
  same_subject_edit1.jsonl  one edit per edited subject
  same_subject_edit2.jsonl  two edits per edited subject (two different relations; the
                            first is the one in edit1)
An edit's prompt is the relation's first correctly answered phrasing, target_true its
answer; paraphrases: up to 2 other phrasings (correctly answered ones first). Which of a
subject's kept relations is edited rotates with the subject's position, so every relation
is edited somewhere. Every HOLDOUT_EVERY-th kept subject (that has a kept relation of a
kind shared with others) is never edited: those subjects supply the neighbourhood prompts
(N_NEIGHBOURS per edit: the same relation about never-edited subjects, with their true
answers), so specificity is not mixed up with the edited subjects' other facts.

Deterministic: greedy decoding, candidates in a fixed order, no sampling.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
OUT = ROOT / "examples" / "smollm2"

HOLDOUT_EVERY = 6   # every 6th kept subject only supplies neighbourhood prompts
N_NEIGHBOURS = 3
MAX_PARAPHRASES = 2

US = ("United States", "the United States", "USA", "the USA", "the US", "the U.S.", "America")
UK = ("United Kingdom", "the United Kingdom", "UK", "the UK", "England", "Britain", "Great Britain")
ENGLAND = ("England", "United Kingdom", "the United Kingdom", "UK", "the UK", "Britain", "Great Britain")

# (kind, relation) -> phrasings; "{}" is the subject.
TEMPLATES: dict[tuple[str, str], list[str]] = {
    ("country", "capital"): ["The capital of {} is", "The capital city of {} is", "{}'s capital is"],
    ("country", "language"): ["The official language of {} is", "The main language spoken in {} is",
                              "In {}, most people speak"],
    ("country", "continent"): ["{} is located in the continent of", "{} is a country on the continent of",
                               "The continent where {} is located is"],
    ("country", "currency"): ["The currency of {} is the", "The official currency of {} is the",
                              "In {}, people pay with the"],
    ("city", "country"): ["{} is a city in the country of", "{} is located in the country of",
                          "The city of {} is in the country of"],
    ("city", "continent"): ["{} is located in the continent of", "{} is a city on the continent of",
                            "The city of {} is on the continent of"],
    ("city", "language"): ["The main language spoken in {} is", "In {}, most people speak",
                            "The people of {} speak"],
    ("city", "river"): ["The river that flows through {} is the", "The main river of {} is the",
                        "{} lies on the banks of the"],
    ("uscity", "country"): ["{} is a city in the country of", "{} is located in the country of",
                            "The city of {} is in the country of"],
    ("uscity", "state"): ["{} is a city in the state of", "{} is located in the state of",
                          "The city of {} is in the state of"],
    ("landmark", "city"): ["{} is located in the city of", "{} can be found in the city of",
                           "To see {}, you have to travel to the city of"],
    ("landmark", "country"): ["{} is located in the country of", "{} can be found in the country of",
                              "To see {}, you have to travel to the country of"],
    ("landmark", "continent"): ["{} is located on the continent of", "{} can be found on the continent of"],
    ("person", "birth_country"): ["{} was born in the country of", "The country where {} was born is",
                                  "{} was a citizen of the country of"],
    ("person", "mother_tongue"): ["The mother tongue of {} is", "The native language of {} is",
                                  "{} spoke the language"],
    ("person", "occupation"): ["{} worked as a", "By profession, {} was a", "{} was a famous"],
    ("person", "known_for"): ["{} is best known for", "{} is famous for"],
    ("person", "company"): ["{} is the founder of", "{} founded the company", "The company founded by {} is"],
    ("person", "sport"): ["{} is famous for playing", "The sport played by {} is", "{} is a professional"],
    ("writer", "birth_country"): ["{} was born in the country of", "The country where {} was born is"],
    ("writer", "mother_tongue"): ["The mother tongue of {} is", "The native language of {} is",
                                  "{} wrote in the language"],
    ("writer", "notable_work"): ["{} is the author of", "{} is best known for writing",
                                 "The most famous book by {} is"],
    ("book", "author"): ["{} was written by", "The author of {} is", "{} is a novel written by"],
    ("book", "language"): ["{} was originally written in", "The original language of {} is"],
    ("book", "author_country"): ["The author of {} was born in the country of",
                                 "{} was written by an author from the country of"],
    ("painting", "painter"): ["{} was painted by", "The painter of {} is", "The artist who painted {} is"],
    ("painting", "painter_country"): ["The painter of {} was born in the country of",
                                      "{} was painted by an artist from the country of"],
    ("painting", "museum_city"): ["{} is displayed in a museum in the city of",
                                  "To see {}, you have to travel to the city of"],
    ("company", "founder"): ["{} was founded by", "The founder of {} is", "{} was created by"],
    ("company", "country"): ["{} is headquartered in the country of", "{} is a company from the country of",
                             "The headquarters of {} are in the country of"],
    ("company", "product"): ["{} is best known for making", "{} is famous for its", "The most famous product of {} is the"],
    ("company", "industry"): ["{} is a company that makes", "{} is a manufacturer of"],
    ("product", "maker"): ["{} is made by", "{} was developed by", "{} is a product of"],
    ("product", "type"): ["{} is a", "{} is a type of"],
    ("product", "maker_country"): ["{} is made by a company from the country of",
                                   "The company that makes {} is based in the country of"],
}

C = "country"
# (subject, kind, {relation: (true answer or tuple of accepted answers, counterfactual)})
CANDIDATES: list[tuple[str, str, dict[str, tuple]]] = [
    # countries
    ("France", C, {"capital": ("Paris", "Tokyo"), "language": ("French", "Japanese"),
                   "continent": ("Europe", "Asia"), "currency": (("euro", "Euro"), "yen")}),
    ("Germany", C, {"capital": ("Berlin", "Lima"), "language": ("German", "Portuguese"),
                    "continent": ("Europe", "South America"), "currency": (("euro",), "peso")}),
    ("Italy", C, {"capital": ("Rome", "Ottawa"), "language": ("Italian", "Korean"),
                  "continent": ("Europe", "North America"), "currency": (("euro",), "dollar")}),
    ("Spain", C, {"capital": ("Madrid", "Beijing"), "language": ("Spanish", "Russian"),
                  "continent": ("Europe", "Asia"), "currency": (("euro",), "rupee")}),
    ("Japan", C, {"capital": ("Tokyo", "Paris"), "language": ("Japanese", "French"),
                  "continent": ("Asia", "Europe"), "currency": (("yen", "Japanese yen"), "euro")}),
    ("China", C, {"capital": ("Beijing", "Madrid"), "language": (("Mandarin", "Chinese", "Mandarin Chinese"), "Spanish"),
                  "continent": ("Asia", "Africa"), "currency": (("yuan", "renminbi", "Chinese yuan"), "pound")}),
    ("Russia", C, {"capital": ("Moscow", "Canberra"), "language": ("Russian", "English"),
                   "continent": (("Europe", "Asia", "Eurasia"), "Australia"), "currency": (("ruble", "rouble", "Russian ruble"), "franc")}),
    ("Egypt", C, {"capital": ("Cairo", "Oslo"), "language": ("Arabic", "Swedish"),
                  "continent": ("Africa", "Europe"), "currency": (("Egyptian pound", "pound"), "yen")}),
    ("Brazil", C, {"capital": ("Brasília", "Berlin"), "language": ("Portuguese", "German"),
                   "continent": ("South America", "Asia"), "currency": (("real", "Brazilian real"), "euro")}),
    ("Canada", C, {"capital": ("Ottawa", "Rome"), "language": (("English", "French"), "Italian"),
                   "continent": ("North America", "Africa"), "currency": (("Canadian dollar", "dollar"), "rupee")}),
    ("Australia", C, {"capital": ("Canberra", "Moscow"), "language": ("English", "Russian"),
                      "continent": (("Australia", "Oceania"), "Europe"), "currency": (("Australian dollar", "dollar"), "ruble")}),
    ("India", C, {"capital": (("New Delhi", "Delhi"), "Stockholm"), "language": (("Hindi", "English"), "Swedish"),
                  "continent": ("Asia", "South America"), "currency": (("rupee", "Indian rupee"), "euro")}),
    ("Mexico", C, {"capital": ("Mexico City", "Cairo"), "language": ("Spanish", "Arabic"),
                   "continent": ("North America", "Europe"), "currency": (("peso", "Mexican peso"), "yen")}),
    ("Greece", C, {"capital": ("Athens", "Nairobi"), "language": ("Greek", "Swahili"),
                   "continent": ("Europe", "Africa"), "currency": (("euro",), "dollar")}),
    ("Portugal", C, {"capital": ("Lisbon", "Seoul"), "language": ("Portuguese", "Korean"),
                     "continent": ("Europe", "Asia"), "currency": (("euro",), "won")}),
    ("Turkey", C, {"capital": ("Ankara", "Dublin"), "language": ("Turkish", "Irish"),
                   "continent": (("Asia", "Europe", "Eurasia"), "South America"), "currency": (("lira", "Turkish lira"), "krona")}),
    ("Sweden", C, {"capital": ("Stockholm", "Cairo"), "language": ("Swedish", "Arabic"),
                   "continent": ("Europe", "Africa"), "currency": (("krona", "Swedish krona"), "rupee")}),
    ("Argentina", C, {"capital": ("Buenos Aires", "Warsaw"), "language": ("Spanish", "Polish"),
                      "continent": ("South America", "Europe"), "currency": (("peso", "Argentine peso"), "zloty")}),
    ("Kenya", C, {"capital": ("Nairobi", "Athens"), "language": (("Swahili", "English"), "Greek"),
                  "continent": ("Africa", "Europe"), "currency": (("shilling", "Kenyan shilling"), "euro")}),
    ("South Korea", C, {"capital": ("Seoul", "Lisbon"), "language": ("Korean", "Portuguese"),
                        "continent": ("Asia", "Europe"), "currency": (("won", "South Korean won", "Korean won"), "euro")}),
    ("Netherlands", C, {"capital": ("Amsterdam", "Bangkok"), "language": ("Dutch", "Thai"),
                        "continent": ("Europe", "Asia"), "currency": (("euro",), "baht")}),
    ("Poland", C, {"capital": ("Warsaw", "Buenos Aires"), "language": ("Polish", "Spanish"),
                   "continent": ("Europe", "South America"), "currency": (("zloty", "złoty", "Polish zloty"), "peso")}),
    ("Ireland", C, {"capital": ("Dublin", "Ankara"), "language": (("English", "Irish"), "Turkish"),
                    "continent": ("Europe", "Asia"), "currency": (("euro",), "lira")}),
    ("Norway", C, {"capital": ("Oslo", "Cairo"), "language": ("Norwegian", "Arabic"),
                   "continent": ("Europe", "Africa"), "currency": (("krone", "Norwegian krone"), "pound")}),
    ("Thailand", C, {"capital": ("Bangkok", "Amsterdam"), "language": ("Thai", "Dutch"),
                     "continent": ("Asia", "Europe"), "currency": (("baht", "Thai baht"), "euro")}),
    ("Peru", C, {"capital": ("Lima", "Berlin"), "language": ("Spanish", "German"),
                 "continent": ("South America", "Europe"), "currency": (("sol", "Peruvian sol", "nuevo sol"), "euro")}),
    ("Switzerland", C, {"capital": ("Bern", "Tokyo"), "language": (("German", "French", "Italian"), "Japanese"),
                        "continent": ("Europe", "Asia"), "currency": (("Swiss franc", "franc"), "yen")}),
    ("Vietnam", C, {"capital": ("Hanoi", "Paris"), "language": ("Vietnamese", "French"),
                    "continent": ("Asia", "Europe"), "currency": (("dong", "Vietnamese dong"), "euro")}),
    ("Austria", C, {"capital": ("Vienna", "Lima"), "language": ("German", "Spanish"),
                    "continent": ("Europe", "South America"), "currency": (("euro",), "peso")}),
    ("Hungary", C, {"capital": ("Budapest", "Manila"), "language": ("Hungarian", "Tagalog"),
                    "continent": ("Europe", "Asia"), "currency": (("forint", "Hungarian forint"), "yen")}),
    ("Finland", C, {"capital": ("Helsinki", "Havana"), "language": ("Finnish", "Spanish"),
                    "continent": ("Europe", "North America"), "currency": (("euro",), "peso")}),
    ("Denmark", C, {"capital": ("Copenhagen", "Nairobi"), "language": ("Danish", "Swahili"),
                    "continent": ("Europe", "Africa"), "currency": (("krone", "Danish krone"), "dollar")}),
    ("Belgium", C, {"capital": ("Brussels", "Tokyo"), "language": (("Dutch", "French", "Flemish"), "Japanese"),
                    "continent": ("Europe", "Asia"), "currency": (("euro",), "yen")}),
    ("Cuba", C, {"capital": ("Havana", "Helsinki"), "language": ("Spanish", "Finnish"),
                 "continent": (("North America", "the Caribbean", "Caribbean"), "Europe"), "currency": (("peso", "Cuban peso"), "euro")}),
    ("Chile", C, {"capital": ("Santiago", "Oslo"), "language": ("Spanish", "Norwegian"),
                  "continent": ("South America", "Europe"), "currency": (("peso", "Chilean peso"), "krone")}),
    ("Colombia", C, {"capital": ("Bogotá", "Prague"), "language": ("Spanish", "Czech"),
                     "continent": ("South America", "Europe"), "currency": (("peso", "Colombian peso"), "koruna")}),
    ("Nigeria", C, {"capital": ("Abuja", "Rome"), "language": ("English", "Italian"),
                    "continent": ("Africa", "Europe"), "currency": (("naira", "Nigerian naira"), "euro")}),
    ("Iran", C, {"capital": ("Tehran", "Lisbon"), "language": (("Persian", "Farsi"), "Portuguese"),
                 "continent": ("Asia", "Europe"), "currency": (("rial", "Iranian rial"), "euro")}),
    ("Pakistan", C, {"capital": ("Islamabad", "Madrid"), "language": (("Urdu", "English"), "Spanish"),
                     "continent": ("Asia", "Europe"), "currency": (("rupee", "Pakistani rupee"), "euro")}),
    ("Indonesia", C, {"capital": ("Jakarta", "Berlin"), "language": (("Indonesian", "Bahasa Indonesia"), "German"),
                      "continent": ("Asia", "Europe"), "currency": (("rupiah", "Indonesian rupiah"), "euro")}),
    ("the Philippines", C, {"capital": ("Manila", "Budapest"), "language": (("Filipino", "Tagalog", "English"), "Hungarian"),
                            "continent": ("Asia", "Europe"), "currency": (("peso", "Philippine peso"), "forint")}),
    ("Israel", C, {"capital": ("Jerusalem", "Ottawa"), "language": ("Hebrew", "Japanese"),
                   "continent": ("Asia", "South America"), "currency": (("shekel", "new shekel", "Israeli new shekel", "Israeli shekel"), "yen")}),
    ("Saudi Arabia", C, {"capital": ("Riyadh", "Stockholm"), "language": ("Arabic", "Swedish"),
                         "continent": ("Asia", "Europe"), "currency": (("riyal", "Saudi riyal"), "krona")}),
    ("Ukraine", C, {"capital": (("Kyiv", "Kiev"), "Lima"), "language": ("Ukrainian", "Spanish"),
                    "continent": ("Europe", "South America"), "currency": (("hryvnia", "Ukrainian hryvnia"), "peso")}),
    ("Czech Republic", C, {"capital": ("Prague", "Bogotá"), "language": ("Czech", "Spanish"),
                           "continent": ("Europe", "South America"), "currency": (("koruna", "Czech koruna", "crown", "Czech crown"), "peso")}),
    ("Morocco", C, {"capital": ("Rabat", "Helsinki"), "language": (("Arabic", "Berber"), "Finnish"),
                    "continent": ("Africa", "Europe"), "currency": (("dirham", "Moroccan dirham"), "euro")}),
    ("New Zealand", C, {"capital": ("Wellington", "Cairo"), "language": (("English", "Maori", "Māori"), "Arabic"),
                        "continent": (("Oceania", "Australia"), "Africa"), "currency": (("New Zealand dollar", "dollar"), "pound")}),
    ("Iceland", C, {"capital": ("Reykjavik", "Bangkok"), "language": ("Icelandic", "Thai"),
                    "continent": ("Europe", "Asia"), "currency": (("króna", "krona", "Icelandic króna", "Icelandic krona"), "baht")}),
    # cities
    ("Paris", "city", {"country": ("France", "Japan"), "continent": ("Europe", "Asia"), "river": ("Seine", "Nile"), "language": ('French', 'Japanese')}),
    ("London", "city", {"country": (UK, "Brazil"), "continent": ("Europe", "South America"), "river": ("Thames", "Amazon"), "language": ('English', 'Portuguese')}),
    ("Rome", "city", {"country": ("Italy", "China"), "continent": ("Europe", "Asia"), "river": ("Tiber", "Mississippi"), "language": ('Italian', 'Chinese')}),
    ("Cairo", "city", {"country": ("Egypt", "Canada"), "continent": ("Africa", "North America"), "river": ("Nile", "Thames"), "language": ('Arabic', 'French')}),
    ("Vienna", "city", {"country": ("Austria", "Mexico"), "continent": ("Europe", "North America"), "river": ("Danube", "Ganges"), "language": ('German', 'Spanish')}),
    ("Budapest", "city", {"country": ("Hungary", "Peru"), "continent": ("Europe", "South America"), "river": ("Danube", "Seine"), "language": ('Hungarian', 'Spanish')}),
    ("Tokyo", "city", {"country": ("Japan", "Italy"), "continent": ("Asia", "Europe"), "language": ('Japanese', 'Italian')}),
    ("Moscow", "city", {"country": ("Russia", "Argentina"), "continent": (("Europe", "Asia"), "South America"), "river": (("Moskva", "Moscow"), "Thames"), "language": ('Russian', 'Spanish')}),
    ("Berlin", "city", {"country": ("Germany", "India"), "continent": ("Europe", "Asia"), "river": ("Spree", "Nile"), "language": ('German', 'Hindi')}),
    ("Madrid", "city", {"country": ("Spain", "Kenya"), "continent": ("Europe", "Africa"), "language": ('Spanish', 'Swahili')}),
    ("Sydney", "city", {"country": ("Australia", "Norway"), "continent": (("Australia", "Oceania"), "Europe"), "language": ('English', 'Norwegian')}),
    ("Mumbai", "city", {"country": ("India", "Sweden"), "continent": ("Asia", "Europe"), "language": (('Marathi', 'Hindi'), 'Swedish')}),
    ("Istanbul", "city", {"country": ("Turkey", "Chile"), "continent": (("Europe", "Asia"), "South America"), "river": (("Bosphorus", "Bosporus"), "Thames"), "language": ('Turkish', 'Spanish')}),
    ("Rio de Janeiro", "city", {"country": ("Brazil", "Poland"), "continent": ("South America", "Europe"), "language": ('Portuguese', 'Polish')}),
    ("Toronto", "city", {"country": ("Canada", "Egypt"), "continent": ("North America", "Africa"), "language": ('English', 'Arabic')}),
    ("Beijing", "city", {"country": ("China", "Spain"), "continent": ("Asia", "Europe"), "language": (('Mandarin', 'Chinese', 'Mandarin Chinese'), 'Spanish')}),
    ("Amsterdam", "city", {"country": ("Netherlands", "Japan"), "continent": ("Europe", "Asia"), "language": ('Dutch', 'Japanese')}),
    ("Athens", "city", {"country": ("Greece", "Canada"), "continent": ("Europe", "North America"), "language": ('Greek', 'French')}),
    ("Shanghai", "city", {"country": ("China", "Germany"), "continent": ("Asia", "Europe"), "river": (("Huangpu", "Yangtze"), "Rhine"), "language": (('Mandarin', 'Chinese', 'Shanghainese', 'Mandarin Chinese'), 'German')}),
    ("Buenos Aires", "city", {"country": ("Argentina", "Finland"), "continent": ("South America", "Europe"), "language": ('Spanish', 'Finnish')}),
    ("Dublin", "city", {"country": ("Ireland", "Chile"), "continent": ("Europe", "Asia"), "language": (("English", "Irish"), "Turkish")}),
    ("Lisbon", "city", {"country": ("Portugal", "Korea"), "continent": ("Europe", "Asia"), "language": ("Portuguese", "Korean"), "river": (("Tagus", "Tejo"), "Thames")}),
    ("Stockholm", "city", {"country": ("Sweden", "Egypt"), "continent": ("Europe", "Africa"), "language": ("Swedish", "Arabic")}),
    ("Oslo", "city", {"country": ("Norway", "Mexico"), "continent": ("Europe", "North America"), "language": ("Norwegian", "Spanish")}),
    ("Warsaw", "city", {"country": ("Poland", "Argentina"), "continent": ("Europe", "South America"), "language": ("Polish", "Spanish"), "river": (("Vistula", "Wisła"), "Nile")}),
    ("Prague", "city", {"country": (("Czech Republic", "the Czech Republic", "Czechia"), "Colombia"), "continent": ("Europe", "South America"), "language": ("Czech", "Spanish"), "river": (("Vltava", "Moldau"), "Amazon")}),
    ("Bangkok", "city", {"country": ("Thailand", "Netherlands"), "continent": ("Asia", "Europe"), "language": ("Thai", "Dutch")}),
    ("Seoul", "city", {"country": ("South Korea", "Portugal"), "continent": ("Asia", "Europe"), "language": ("Korean", "Portuguese"), "river": (("Han", "Han River"), "Seine")}),
    ("Nairobi", "city", {"country": ("Kenya", "Greece"), "continent": ("Africa", "Europe"), "language": (("Swahili", "English"), "Greek")}),
    ("Lima", "city", {"country": ("Peru", "Germany"), "continent": ("South America", "Europe"), "language": ("Spanish", "German")}),
    ("Barcelona", "city", {"country": ("Spain", "Ireland"), "continent": ("Europe", "Asia"), "language": (("Catalan", "Spanish"), "Irish")}),
    ("Milan", "city", {"country": ("Italy", "Japan"), "continent": ("Europe", "Asia"), "language": ("Italian", "Japanese")}),
    ("Venice", "city", {"country": ("Italy", "Brazil"), "continent": ("Europe", "South America"), "language": ("Italian", "Portuguese")}),
    ("Munich", "city", {"country": ("Germany", "Australia"), "continent": ("Europe", "Asia"), "language": ("German", "Chinese")}),
    ("Kyoto", "city", {"country": ("Japan", "France"), "continent": ("Asia", "Europe"), "language": ("Japanese", "French")}),
    ("Florence", "city", {"country": ("Italy", "Canada"), "continent": ("Europe", "North America"), "language": ("Italian", "English"), "river": ("Arno", "Danube")}),
    ("Baghdad", "city", {"country": ("Iraq", "Sweden"), "continent": ("Asia", "Europe"), "language": ("Arabic", "Swedish"), "river": ("Tigris", "Thames")}),
    ("Havana", "city", {"country": ("Cuba", "Finland"), "continent": (("North America", "the Caribbean", "Caribbean"), "Europe"), "language": ("Spanish", "Finnish")}),
    ("Manchester", "city", {"country": (ENGLAND, "Brazil"), "continent": ("Europe", "South America"), "language": ("English", "Portuguese")}),
    ("Marseille", "city", {"country": ("France", "India"), "continent": ("Europe", "Asia"), "language": ("French", "Hindi")}),
    ("Chicago", "uscity", {"country": (US, "France"), "state": ("Illinois", "Texas")}),
    ("Los Angeles", "uscity", {"country": (US, "Italy"), "state": ("California", "Ohio")}),
    ("Houston", "uscity", {"country": (US, "Spain"), "state": ("Texas", "Vermont")}),
    ("Miami", "uscity", {"country": (US, "Russia"), "state": ("Florida", "Alaska")}),
    ("Seattle", "uscity", {"country": (US, "Germany"), "state": ("Washington", "Georgia")}),
    ("Boston", "uscity", {"country": (US, "Japan"), "state": ("Massachusetts", "Arizona")}),
    ("Las Vegas", "uscity", {"country": (US, "Egypt"), "state": ("Nevada", "Maine")}),
    # landmarks
    ("the Eiffel Tower", "landmark", {"city": ("Paris", "Rome"), "country": ("France", "Italy"), "continent": ("Europe", "Asia")}),
    ("the Colosseum", "landmark", {"city": ("Rome", "London"), "country": ("Italy", "England"), "continent": ("Europe", "Africa")}),
    ("Big Ben", "landmark", {"city": ("London", "Paris"), "country": (ENGLAND, "France"), "continent": ("Europe", "Asia")}),
    ("the Statue of Liberty", "landmark", {"city": (("New York", "New York City"), "Tokyo"), "country": (US, "Japan"),
                                           "continent": ("North America", "Europe")}),
    ("the Taj Mahal", "landmark", {"city": ("Agra", "Cairo"), "country": ("India", "Egypt"), "continent": ("Asia", "Africa")}),
    ("the Great Wall", "landmark", {"country": ("China", "Brazil"), "continent": ("Asia", "South America")}),
    ("the Kremlin", "landmark", {"city": ("Moscow", "Madrid"), "country": ("Russia", "Spain"), "continent": (("Europe", "Asia"), "Africa")}),
    ("the Sydney Opera House", "landmark", {"city": ("Sydney", "Berlin"), "country": ("Australia", "Germany"),
                                            "continent": (("Australia", "Oceania"), "Europe")}),
    ("the Leaning Tower of Pisa", "landmark", {"city": ("Pisa", "Vienna"), "country": ("Italy", "Austria"), "continent": ("Europe", "Asia")}),
    ("the Golden Gate Bridge", "landmark", {"city": ("San Francisco", "Sydney"), "country": (US, "Australia"),
                                            "continent": ("North America", "Europe")}),
    ("the Brandenburg Gate", "landmark", {"city": ("Berlin", "Lisbon"), "country": ("Germany", "Portugal"), "continent": ("Europe", "Asia")}),
    ("the Acropolis", "landmark", {"city": ("Athens", "Chicago"), "country": ("Greece", "Mexico"), "continent": ("Europe", "North America")}),
    ("the Louvre", "landmark", {"city": ("Paris", "Moscow"), "country": ("France", "Russia"), "continent": ("Europe", "Asia")}),
    ("the Sagrada Familia", "landmark", {"city": ("Barcelona", "Dublin"), "country": ("Spain", "Ireland"), "continent": ("Europe", "Africa")}),
    ("Machu Picchu", "landmark", {"country": ("Peru", "Norway"), "continent": ("South America", "Europe")}),
    ("the Great Pyramid of Giza", "landmark", {"city": (("Giza", "Cairo"), "Athens"), "country": ("Egypt", "Greece"),
                                               "continent": ("Africa", "Europe")}),
    ("Christ the Redeemer", "landmark", {"city": ("Rio de Janeiro", "Madrid"), "country": ("Brazil", "Spain"),
                                         "continent": ("South America", "Europe")}),
    ("the Burj Khalifa", "landmark", {"city": ("Dubai", "Oslo"), "country": (("United Arab Emirates", "the United Arab Emirates", "UAE", "the UAE"), "Norway"),
                                      "continent": ("Asia", "Europe")}),
    ("the Empire State Building", "landmark", {"city": (("New York", "New York City", "Manhattan"), "Rome"), "country": (US, "Italy"),
                                               "continent": ("North America", "Europe")}),
    ("Buckingham Palace", "landmark", {"city": ("London", "Tokyo"), "country": (ENGLAND, "Japan"), "continent": ("Europe", "Asia")}),
    ("the White House", "landmark", {"city": (("Washington", "Washington, D.C."), "Beijing"), "country": (US, "China"),
                                     "continent": ("North America", "Asia")}),
    ("Mount Fuji", "landmark", {"country": ("Japan", "Chile"), "continent": ("Asia", "South America")}),
    ("Angkor Wat", "landmark", {"country": ("Cambodia", "Italy"), "continent": ("Asia", "Europe")}),
    ("Stonehenge", "landmark", {"country": (ENGLAND, "Mexico"), "continent": ("Europe", "North America")}),
    ("the Forbidden City", "landmark", {"city": ("Beijing", "Paris"), "country": ("China", "France"), "continent": ("Asia", "Europe")}),
    # people
    ("Albert Einstein", "person", {"birth_country": ("Germany", "Brazil"), "mother_tongue": ("German", "Japanese"),
                                   "occupation": ("physicist", "chef"), "known_for": (("the theory of relativity", "his theory of relativity", "relativity"), "the telephone")}),
    ("Isaac Newton", "person", {"birth_country": ("England", "Peru"), "mother_tongue": ("English", "Chinese"),
                                "occupation": (("physicist", "mathematician", "scientist"), "painter"), "known_for": (("his laws of motion", "the law of gravity", "his law of", "gravity", "the laws of motion", "his theory of gravity", "discovering gravity"), "the light bulb")}),
    ("Leonardo da Vinci", "person", {"birth_country": ("Italy", "Sweden"), "mother_tongue": ("Italian", "Swedish"),
                                     "occupation": (("painter", "artist"), "banker")}),
    ("Pablo Picasso", "person", {"birth_country": ("Spain", "Japan"), "mother_tongue": ("Spanish", "Japanese"),
                                 "occupation": (("painter", "artist"), "lawyer")}),
    ("Vincent van Gogh", "person", {"birth_country": ("Netherlands", "Mexico"), "mother_tongue": ("Dutch", "Spanish"),
                                    "occupation": (("painter", "artist"), "pilot")}),
    ("Wolfgang Amadeus Mozart", "person", {"birth_country": ("Austria", "India"), "mother_tongue": ("German", "Hindi"),
                                           "occupation": (("composer", "musician"), "sailor")}),
    ("Ludwig van Beethoven", "person", {"birth_country": ("Germany", "Argentina"), "mother_tongue": ("German", "Portuguese"),
                                        "occupation": (("composer", "musician", "pianist"), "farmer")}),
    ("Charles Darwin", "person", {"birth_country": (ENGLAND, "Russia"), "mother_tongue": ("English", "Russian"),
                                  "occupation": (("naturalist", "biologist", "scientist"), "architect"),
                                  "known_for": (("the theory of evolution", "his theory of evolution", "evolution"), "the printing press")}),
    ("Napoleon Bonaparte", "person", {"birth_country": ("France", "Korea"), "mother_tongue": (("French", "Corsican", "Italian"), "Korean"),
                                      "occupation": (("military", "general", "emperor", "soldier"), "poet")}),
    ("Marie Curie", "person", {"birth_country": ("Poland", "Egypt"), "mother_tongue": ("Polish", "Arabic"),
                               "occupation": (("physicist", "chemist", "scientist"), "singer"),
                               "known_for": (("her discovery of radium", "discovering radium", "her work on radioactivity", "radioactivity", "her research on radioactivity", "the discovery of radium", "her discovery of"), "the steam engine")}),
    ("Galileo Galilei", "person", {"birth_country": ("Italy", "Norway"), "mother_tongue": ("Italian", "Norwegian"),
                                   "occupation": (("astronomer", "physicist", "scientist", "mathematician"), "baker")}),
    ("Barack Obama", "person", {"birth_country": (US, "Kenya"), "mother_tongue": ("English", "French"),
                                "occupation": (("president", "politician", "lawyer"), "chef")}),
    ("Abraham Lincoln", "person", {"birth_country": (US, "Spain"), "mother_tongue": ("English", "German"),
                                   "occupation": (("president", "lawyer", "politician"), "painter")}),
    ("Mahatma Gandhi", "person", {"birth_country": ("India", "Canada"), "mother_tongue": ("Gujarati", "French"),
                                  "occupation": (("lawyer", "politician", "leader", "activist"), "astronaut")}),
    ("Nelson Mandela", "person", {"birth_country": ("South Africa", "Sweden"), "mother_tongue": (("Xhosa", "isiXhosa"), "Swedish"),
                                  "occupation": (("president", "politician", "lawyer", "activist"), "composer")}),
    ("Cristiano Ronaldo", "person", {"birth_country": ("Portugal", "Japan"), "mother_tongue": ("Portuguese", "Japanese"),
                                     "sport": (("football", "soccer", "footballer", "soccer player", "football player"), "golf")}),
    ("Lionel Messi", "person", {"birth_country": ("Argentina", "Sweden"), "mother_tongue": ("Spanish", "Swedish"),
                                "sport": (("football", "soccer", "footballer", "soccer player", "football player"), "tennis")}),
    ("Michael Jordan", "person", {"birth_country": (US, "Italy"), "mother_tongue": ("English", "Italian"),
                                  "sport": (("basketball", "basketball player"), "golf")}),
    ("Roger Federer", "person", {"birth_country": ("Switzerland", "Brazil"), "mother_tongue": (("German", "Swiss German"), "Portuguese"),
                                 "sport": (("tennis", "tennis player"), "basketball")}),
    ("Serena Williams", "person", {"birth_country": (US, "Russia"), "mother_tongue": ("English", "Russian"),
                                   "sport": (("tennis", "tennis player"), "football")}),
    ("Tiger Woods", "person", {"birth_country": (US, "France"), "mother_tongue": ("English", "French"),
                               "sport": (("golf", "golfer"), "basketball")}),
    ("Usain Bolt", "person", {"birth_country": ("Jamaica", "Finland"), "mother_tongue": ("English", "Finnish"),
                              "sport": (("sprinting", "track and field", "athletics", "sprinter", "running", "track"), "chess")}),
    ("Bill Gates", "person", {"birth_country": (US, "China"), "mother_tongue": ("English", "Chinese"),
                              "company": ("Microsoft", "Toyota")}),
    ("Steve Jobs", "person", {"birth_country": (US, "Germany"), "mother_tongue": ("English", "German"),
                              "company": ("Apple", "Samsung")}),
    ("Mark Zuckerberg", "person", {"birth_country": (US, "Spain"), "mother_tongue": ("English", "Spanish"),
                                   "company": ("Facebook", "Nintendo")}),
    ("Jeff Bezos", "person", {"birth_country": (US, "Italy"), "mother_tongue": ("English", "Italian"),
                              "company": ("Amazon", "Ferrari")}),
    ("Elon Musk", "person", {"birth_country": ("South Africa", "Japan"), "mother_tongue": ("English", "Japanese"),
                             "company": (("Tesla", "SpaceX"), "Nokia")}),
    ("Walt Disney", "person", {"birth_country": (US, "India"), "mother_tongue": ("English", "Hindi"),
                               "company": (("Disney", "The Walt Disney Company", "Walt Disney"), "Adidas")}),
    ("Henry Ford", "person", {"birth_country": (US, "Poland"), "mother_tongue": ("English", "Polish"),
                              "company": (("Ford", "the Ford Motor Company", "Ford Motor Company"), "Sony")}),
    # writers
    ("William Shakespeare", "writer", {"birth_country": ("England", "Australia"), "mother_tongue": ("English", "French"),
                                       "notable_work": (("Romeo and Juliet", "Hamlet", "Macbeth", "plays", "the plays"), "Don Quixote")}),
    ("J.K. Rowling", "writer", {"birth_country": (ENGLAND, "Brazil"), "mother_tongue": ("English", "Portuguese"),
                                "notable_work": (("Harry Potter", "the Harry Potter"), "War and Peace")}),
    ("Charles Dickens", "writer", {"birth_country": (ENGLAND, "Mexico"), "mother_tongue": ("English", "Spanish"),
                                   "notable_work": (("Oliver Twist", "A Christmas Carol", "Great Expectations", "A Tale of Two Cities", "David Copperfield"), "Moby-Dick")}),
    ("Mark Twain", "writer", {"birth_country": (US, "Greece"), "mother_tongue": ("English", "Greek"),
                              "notable_work": (("The Adventures of Tom Sawyer", "Tom Sawyer", "Adventures of Huckleberry Finn", "The Adventures of Huckleberry Finn", "Huckleberry Finn"), "Hamlet")}),
    ("Leo Tolstoy", "writer", {"birth_country": ("Russia", "Spain"), "mother_tongue": ("Russian", "Spanish"),
                               "notable_work": (("War and Peace", "Anna Karenina"), "Harry Potter")}),
    ("Victor Hugo", "writer", {"birth_country": ("France", "Japan"), "mother_tongue": ("French", "Japanese"),
                               "notable_work": (("Les Misérables", "Les Miserables", "The Hunchback of Notre-Dame", "The Hunchback of Notre Dame"), "The Odyssey")}),
    ("Miguel de Cervantes", "writer", {"birth_country": ("Spain", "Ireland"), "mother_tongue": ("Spanish", "Irish"),
                                       "notable_work": (("Don Quixote", "Don Quijote"), "Hamlet")}),
    ("George Orwell", "writer", {"birth_country": ("India", "Peru"), "mother_tongue": ("English", "Dutch"),
                                 "notable_work": (("1984", "Nineteen Eighty-Four", "Animal Farm"), "Dracula")}),
    ("Jane Austen", "writer", {"birth_country": (ENGLAND, "Russia"), "mother_tongue": ("English", "Russian"),
                               "notable_work": (("Pride and Prejudice", "Sense and Sensibility", "Emma"), "Ulysses")}),
    ("Ernest Hemingway", "writer", {"birth_country": (US, "China"), "mother_tongue": ("English", "Chinese"),
                                    "notable_work": (("The Old Man and the Sea", "A Farewell to Arms", "For Whom the Bell Tolls", "The Sun Also Rises"), "Frankenstein")}),
    ("J.R.R. Tolkien", "writer", {"birth_country": ("South Africa", "Chile"), "mother_tongue": ("English", "Spanish"),
                                  "notable_work": (("The Lord of the Rings", "The Hobbit", "Lord of the Rings"), "Les Misérables")}),
    ("Agatha Christie", "writer", {"birth_country": (ENGLAND, "Brazil"), "mother_tongue": ("English", "Portuguese"),
                                   "notable_work": (("Murder on the Orient Express", "the Hercule Poirot", "Hercule Poirot", "detective novels", "her detective novels", "mystery novels", "her mystery novels"), "War and Peace")}),
    ("Homer", "writer", {"birth_country": ("Greece", "Canada"), "mother_tongue": (("Greek", "Ancient Greek"), "Chinese"),
                         "notable_work": (("the Iliad", "The Odyssey", "the Odyssey", "Iliad", "Odyssey"), "Don Quixote")}),
    ("Dante Alighieri", "writer", {"birth_country": ("Italy", "Kenya"), "mother_tongue": ("Italian", "Swahili"),
                                   "notable_work": (("The Divine Comedy", "the Divine Comedy", "Divine Comedy", "The Inferno", "Inferno"), "The Iliad")}),
    # books
    ("Harry Potter", "book", {"author": (("J.K. Rowling", "JK Rowling", "J. K. Rowling"), "Stephen King"), "language": ("English", "Russian"),
                              "author_country": (ENGLAND, "Russia")}),
    ("Romeo and Juliet", "book", {"author": (("William Shakespeare", "Shakespeare"), "Charles Dickens"), "language": ("English", "Italian"),
                                  "author_country": ("England", "Germany")}),
    ("Hamlet", "book", {"author": (("William Shakespeare", "Shakespeare"), "Mark Twain"), "language": ("English", "Danish"),
                        "author_country": ("England", "Japan")}),
    ("War and Peace", "book", {"author": (("Leo Tolstoy", "Tolstoy"), "Jane Austen"), "language": ("Russian", "English"),
                               "author_country": ("Russia", "England")}),
    ("Don Quixote", "book", {"author": (("Miguel de Cervantes", "Cervantes"), "Victor Hugo"), "language": ("Spanish", "French"),
                             "author_country": ("Spain", "France")}),
    ("Les Misérables", "book", {"author": ("Victor Hugo", "Leo Tolstoy"), "language": ("French", "Russian"),
                                "author_country": ("France", "Russia")}),
    ("The Lord of the Rings", "book", {"author": (("J.R.R. Tolkien", "JRR Tolkien", "J. R. R. Tolkien", "Tolkien"), "George Orwell"),
                                       "language": ("English", "German"), "author_country": ("South Africa", "Argentina")}),
    ("Pride and Prejudice", "book", {"author": ("Jane Austen", "Mark Twain"), "language": ("English", "Spanish"),
                                     "author_country": (ENGLAND, "United States")}),
    ("The Adventures of Tom Sawyer", "book", {"author": ("Mark Twain", "Jane Austen"), "language": ("English", "French"),
                                              "author_country": (US, "France")}),
    ("Oliver Twist", "book", {"author": ("Charles Dickens", "Ernest Hemingway"), "language": ("English", "Italian"),
                              "author_country": (ENGLAND, "Italy")}),
    ("The Old Man and the Sea", "book", {"author": ("Ernest Hemingway", "Charles Dickens"), "language": ("English", "Spanish"),
                                         "author_country": (US, "India")}),
    ("Animal Farm", "book", {"author": ("George Orwell", "Leo Tolstoy"), "language": ("English", "Russian"),
                             "author_country": ("India", "Russia")}),
    ("The Divine Comedy", "book", {"author": ("Dante Alighieri", "Homer"), "language": ("Italian", "Greek"),
                                   "author_country": ("Italy", "Greece")}),
    ("Sherlock Holmes", "book", {"author": (("Arthur Conan Doyle", "Sir Arthur Conan Doyle"), "Agatha Christie"), "language": ("English", "German"),
                                 "author_country": (("Scotland", "United Kingdom", "the United Kingdom", "UK", "the UK"), "Japan")}),
    # paintings
    ("the Mona Lisa", "painting", {"painter": ("Leonardo da Vinci", "Pablo Picasso"), "painter_country": ("Italy", "Spain"),
                                   "museum_city": ("Paris", "Madrid")}),
    ("The Starry Night", "painting", {"painter": ("Vincent van Gogh", "Claude Monet"), "painter_country": ("Netherlands", "France"),
                                      "museum_city": ("New York", "London")}),
    ("The Last Supper", "painting", {"painter": ("Leonardo da Vinci", "Rembrandt"), "painter_country": ("Italy", "Netherlands"),
                                     "museum_city": ("Milan", "Vienna")}),
    ("Guernica", "painting", {"painter": ("Pablo Picasso", "Salvador Dalí"), "painter_country": ("Spain", "Italy"),
                              "museum_city": ("Madrid", "Rome")}),
    ("The Scream", "painting", {"painter": ("Edvard Munch", "Vincent van Gogh"), "painter_country": ("Norway", "Netherlands"),
                                "museum_city": ("Oslo", "Amsterdam")}),
    ("The Night Watch", "painting", {"painter": ("Rembrandt", "Pablo Picasso"), "painter_country": ("Netherlands", "Spain"),
                                     "museum_city": ("Amsterdam", "Paris")}),
    # companies
    ("Microsoft", "company", {"founder": (("Bill Gates", "Paul Allen"), "Steve Jobs"), "country": (US, "Japan"),
                              "product": (("Windows", "its Windows", "the Windows"), "PlayStation"), "industry": (("software", "computer software"), "cars")}),
    ("Apple", "company", {"founder": (("Steve Jobs", "Steve Wozniak"), "Bill Gates"), "country": (US, "Germany"),
                          "product": (("iPhone", "iPhones", "the iPhone", "its iPhone", "Mac", "the Mac", "iPod", "the iPod"), "Walkman"),
                          "industry": (("computers", "consumer electronics", "smartphones", "electronics", "iPhones"), "cars")}),
    ("Google", "company", {"founder": (("Larry Page", "Sergey Brin"), "Jeff Bezos"), "country": (US, "China"),
                           "product": (("search engine", "its search engine", "the search engine", "Google Search", "Search"), "Corolla")}),
    ("Amazon", "company", {"founder": ("Jeff Bezos", "Mark Zuckerberg"), "country": (US, "France")}),
    ("Facebook", "company", {"founder": ("Mark Zuckerberg", "Larry Page"), "country": (US, "Brazil")}),
    ("Tesla", "company", {"founder": (("Elon Musk", "Martin Eberhard"), "Henry Ford"), "country": (US, "Italy"),
                          "industry": (("electric cars", "electric vehicles", "cars", "electric"), "furniture")}),
    ("Toyota", "company", {"founder": (("Kiichiro Toyoda", "Sakichi Toyoda"), "Enzo Ferrari"), "country": ("Japan", "Sweden"),
                           "industry": (("cars", "automobiles", "vehicles", "automotive"), "shoes")}),
    ("Sony", "company", {"founder": (("Masaru Ibuka", "Akio Morita"), "Bill Gates"), "country": ("Japan", "Mexico"),
                         "product": (("PlayStation", "the PlayStation", "Walkman", "the Walkman", "televisions", "electronics"), "iPhone"),
                         "industry": (("electronics", "consumer electronics", "video games", "televisions"), "cars")}),
    ("Samsung", "company", {"founder": ("Lee Byung-chul", "Steve Jobs"), "country": ("South Korea", "Canada"),
                            "industry": (("electronics", "smartphones", "consumer electronics", "phones", "mobile phones"), "furniture")}),
    ("Nintendo", "company", {"founder": ("Fusajiro Yamauchi", "Elon Musk"), "country": ("Japan", "Brazil"),
                             "product": (("video games", "games", "Mario", "Super Mario", "the Switch", "Switch", "consoles", "video game consoles"), "cars"),
                             "industry": (("video games", "video game consoles", "games", "consoles", "gaming consoles"), "cars")}),
    ("BMW", "company", {"country": ("Germany", "India"), "industry": (("cars", "automobiles", "luxury cars", "vehicles", "motorcycles"), "software")}),
    ("Volkswagen", "company", {"country": ("Germany", "Brazil"), "industry": (("cars", "automobiles", "vehicles"), "software")}),
    ("Ferrari", "company", {"founder": ("Enzo Ferrari", "Henry Ford"), "country": ("Italy", "Sweden"),
                            "industry": (("sports cars", "cars", "luxury sports cars", "racing cars", "luxury cars"), "furniture")}),
    ("IKEA", "company", {"founder": ("Ingvar Kamprad", "Henry Ford"), "country": ("Sweden", "Italy"),
                         "industry": (("furniture", "home furnishings", "flat-pack furniture"), "cars")}),
    ("Nokia", "company", {"country": ("Finland", "Brazil"), "industry": (("mobile phones", "phones", "cell phones", "telecommunications", "smartphones"), "furniture")}),
    ("Coca-Cola", "company", {"founder": (("John Pemberton", "John Stith Pemberton", "Asa Griggs Candler", "Asa Candler"), "Henry Ford"),
                              "country": (US, "Russia"), "product": (("soft drinks", "Coca-Cola", "Coke", "its soft drinks", "its soda", "soda", "its iconic"), "cars")}),
    ("McDonald's", "company", {"founder": (("Ray Kroc", "Richard McDonald", "Richard and Maurice McDonald", "the McDonald brothers", "brothers Richard"), "Walt Disney"),
                               "country": (US, "Japan"), "product": (("hamburgers", "burgers", "its burgers", "its hamburgers", "Big Mac", "the Big Mac", "fast food", "its fast food", "its Big Mac"), "smartphones")}),
    ("Nike", "company", {"founder": (("Phil Knight", "Bill Bowerman"), "Bill Gates"), "country": (US, "China"),
                         "industry": (("shoes", "athletic shoes", "sports shoes", "sportswear", "athletic footwear", "footwear", "sneakers", "athletic apparel"), "cars")}),
    ("Adidas", "company", {"founder": ("Adolf Dassler", "Phil Knight"), "country": ("Germany", "Mexico"),
                           "industry": (("shoes", "sportswear", "athletic shoes", "sports shoes", "footwear", "sneakers", "sports equipment", "athletic apparel"), "cars")}),
    ("Netflix", "company", {"founder": (("Reed Hastings", "Marc Randolph"), "Jeff Bezos"), "country": (US, "India")}),
    ("Honda", "company", {"founder": ("Soichiro Honda", "Enzo Ferrari"), "country": ("Japan", "Argentina"),
                          "industry": (("cars", "motorcycles", "automobiles", "vehicles"), "furniture")}),
    # products
    ("the iPhone", "product", {"maker": ("Apple", "Samsung"), "type": (("smartphone", "mobile phone", "phone", "cell phone"), "car"),
                               "maker_country": (US, "South Korea")}),
    ("Windows", "product", {"maker": ("Microsoft", "Apple"), "type": (("operating system", "computer operating system"), "game"),
                            "maker_country": (US, "Japan")}),
    ("the PlayStation", "product", {"maker": ("Sony", "Microsoft"), "type": (("video game console", "game console", "gaming console", "console", "home video game console"), "car"),
                                    "maker_country": ("Japan", "United States")}),
    ("the Xbox", "product", {"maker": ("Microsoft", "Sony"), "type": (("video game console", "game console", "gaming console", "console", "home video game console"), "phone"),
                             "maker_country": (US, "Japan")}),
    ("Android", "product", {"maker": ("Google", "Apple"), "type": (("operating system", "mobile operating system"), "car"),
                            "maker_country": (US, "Finland")}),
    ("the Kindle", "product", {"maker": ("Amazon", "Google"), "type": (("e-reader", "e-book reader", "ebook reader", "electronic reader", "tablet"), "car"),
                               "maker_country": (US, "Germany")}),
    ("the Corolla", "product", {"maker": ("Toyota", "Ford"), "type": (("car", "compact car", "sedan"), "phone"),
                                "maker_country": ("Japan", "United States")}),
    ("the Mustang", "product", {"maker": (("Ford", "the Ford Motor Company", "Ford Motor Company"), "Toyota"), "type": (("car", "sports car", "muscle car", "pony car"), "phone"),
                                "maker_country": (US, "Japan")}),
    ("the Walkman", "product", {"maker": ("Sony", "Apple"), "type": (("portable cassette player", "cassette player", "portable music player", "music player", "portable audio player"), "car"),
                                "maker_country": ("Japan", "United States")}),
    ("Photoshop", "product", {"maker": ("Adobe", "Microsoft"), "type": (("image editing software", "photo editing software", "raster graphics editor", "software", "graphics editing program"), "car"),
                              "maker_country": (US, "Japan")}),
    ("the Big Mac", "product", {"maker": ("McDonald's", "Burger King"), "type": (("hamburger", "burger", "sandwich"), "car"),
                                "maker_country": (US, "France")}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(OUT), help="folder for the three JSONL files")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--verbose", action="store_true", help="print every prompt with its continuation")
    return p.parse_args(argv)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name(text).lower()).strip("-")


def name(subject: str) -> str:
    """The subject as stored: without a lower-case article ("the Eiffel Tower" -> "Eiffel Tower"),
    so it is the same string in every prompt ("The Eiffel Tower is ...", "To see the Eiffel Tower, ...")."""
    return subject[4:] if subject.startswith("the ") else subject


def display(subject: str, prompt: str) -> str:
    """Capitalise a prompt that starts with a lower-case subject ("the Eiffel Tower ...")."""
    return prompt[0].upper() + prompt[1:] if prompt.startswith(subject) else prompt


def prompts_of(subject: str, kind: str, relation: str) -> list[str]:
    return [display(subject, t.replace("{}", subject)) for t in TEMPLATES[(kind, relation)]]


def subject_in(subject: str, prompt: str) -> str:
    """The stored subject, checked to appear in the prompt."""
    assert name(subject) in prompt, (subject, prompt)
    return name(subject)


def answered(continuation: str, answers: tuple[str, ...]) -> str | None:
    """The first answer the continuation starts with (case-insensitive, at a word boundary)."""
    text = continuation.strip().lower()
    for answer in answers:
        a = answer.lower()
        if text.startswith(a) and (len(text) == len(a) or not text[len(a)].isalnum()):
            return answer
    return None


def check(model, tok, batch_size: int, verbose: bool):
    """Every candidate phrasing with the model's greedy continuation and the answer it matches."""
    from nkv.editing.generation import greedy_continuations

    rows = []  # (subject index, subject, kind, relation, prompt, answers, new)
    for si, (subject, kind, rels) in enumerate(CANDIDATES):
        for relation, (true, new) in rels.items():
            answers = (true,) if isinstance(true, str) else tuple(true)
            for prompt in prompts_of(subject, kind, relation):
                rows.append((si, subject, kind, relation, prompt, answers, new))
    n_new = [max(len(tok(" " + a, add_special_tokens=False)["input_ids"]) for a in r[5]) + 1 for r in rows]
    generated = greedy_continuations(model, tok, [r[4] for r in rows], n_new, batch_size)
    out = []
    for r, ids in zip(rows, generated):
        text = tok.decode(ids, skip_special_tokens=True)
        hit = answered(text, r[5])
        if verbose:
            print(f"{'OK ' if hit else '-- '} {r[4]!r} -> {text!r}")
        out.append((*r, hit, text))
    return out


def build_sets(checked):
    """(true facts, edit1, edit2, stats) from the checked phrasings."""
    # per subject, per relation (candidate order): [(prompt, target or None)]
    by_subject: dict[str, dict[str, list[tuple[str, str | None]]]] = {}
    meta: dict[tuple[str, str], str] = {}
    order: list[str] = []
    for si, subject, kind, relation, prompt, answers, new, hit, _ in checked:
        if subject not in by_subject:
            by_subject[subject] = {}
            order.append(subject)
        by_subject[subject].setdefault(relation, []).append((prompt, hit))
        meta[(subject, relation)] = new
    kinds = {s: k for s, k, _ in CANDIDATES}
    kept = {s: [r for r, ps in rels.items() if any(h for _, h in ps)] for s, rels in by_subject.items()}
    subjects = [s for s in order if len(kept[s]) >= 2]
    n_pairs = sum(len(r) for r in by_subject.values())
    n_pairs_ok = sum(len(kept[s]) for s in order)

    true_facts = []
    for s in subjects:
        for r in kept[s]:
            for prompt, hit in by_subject[s][r]:
                if hit:
                    true_facts.append({"subject": subject_in(s, prompt), "relation": r, "prompt": prompt, "target": hit})

    holdout = set(subjects[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY])
    edited = [s for s in subjects if s not in holdout]
    # neighbourhood pool: (kind, relation) -> [(prompt, target)] of never-edited subjects
    pool: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for s in subjects:
        if s in holdout:
            for r in kept[s]:
                prompt, hit = next((p, h) for p, h in by_subject[s][r] if h)
                pool.setdefault((kinds[s], r), []).append((prompt, hit))
    by_relation: dict[str, list[tuple[str, str]]] = {}
    for (k, r), items in pool.items():
        by_relation.setdefault(r, []).extend(items)
    every = [item for items in pool.values() for item in items]

    def edit(s: str, r: str, n: int) -> dict:
        phrasings = by_subject[s][r]
        correct = [(p, h) for p, h in phrasings if h]
        prompt, target_true = correct[0]
        others = [p for p, h in correct[1:]] + [p for p, h in phrasings if not h]
        # same kind and relation first (rotated by n), then the same relation name, then any
        # fact of a never-edited subject; none whose answer is this edit's new target
        def rotated(items: list) -> list:
            return items[n % len(items):] + items[:n % len(items)] if items else []

        picked: list[tuple[str, str]] = []
        for p, t in rotated(pool.get((kinds[s], r), [])) + by_relation.get(r, []) + rotated(every):
            if len(picked) < N_NEIGHBOURS and (p, t) not in picked and t.lower() != meta[(s, r)].lower():
                picked.append((p, t))
        return {"id": f"ss-{slug(s)}-{r}", "subject": subject_in(s, prompt), "prompt": prompt,
                "target_new": meta[(s, r)], "target_true": target_true, "paraphrases": others[:MAX_PARAPHRASES],
                "neighborhood": [{"prompt": p, "target": t} for p, t in picked],
                "tags": [f"relation:{r}", "same_subject"]}

    edit1, edit2 = [], []
    for n, s in enumerate(edited):
        rels = kept[s]
        first, second = rels[n % len(rels)], rels[(n + 1) % len(rels)]
        edit1.append(edit(s, first, n))
        edit2.extend([edit(s, first, n), edit(s, second, n + 1)])
    stats = {
        "candidate_subjects": len(order), "candidate_pairs": n_pairs, "candidate_prompts": len(checked),
        "prompts_correct": sum(1 for c in checked if c[7]), "pairs_correct": n_pairs_ok,
        "subjects_kept": len(subjects), "subjects_edited": len(edited), "subjects_holdout": len(holdout),
        "relations_kept": sum(len(kept[s]) for s in subjects),
        "subjects_with_3plus": sum(1 for s in subjects if len(kept[s]) >= 3),
        "true_prompts": len(true_facts), "edit1": len(edit1), "edit2": len(edit2),
    }
    per_relation: dict[str, list[int]] = {}
    for s in order:
        for r in by_subject[s]:
            c = per_relation.setdefault(f"{kinds[s]}:{r}", [0, 0])
            c[0] += r in kept[s]
            c[1] += 1
    return true_facts, edit1, edit2, stats, per_relation, {s: kept[s] for s in order}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from nkv.loaders.models import load_model

    t0 = time.time()
    model, tok = load_model(args.model)
    model.eval()
    checked = check(model, tok, args.batch_size, args.verbose)
    true_facts, edit1, edit2, stats, per_relation, kept = build_sets(checked)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "same_subject_true.jsonl", true_facts)
    write_jsonl(out / "same_subject_edit1.jsonl", edit1)
    write_jsonl(out / "same_subject_edit2.jsonl", edit2)

    print("relation (kind:relation)        kept/candidate subjects")
    for name, (ok, total) in sorted(per_relation.items()):
        print(f"  {name:30s} {ok:3d}/{total:3d}")
    dropped_subjects = [s for s, rels in kept.items() if len(rels) < 2]
    print(f"subjects dropped (< 2 relations answered): {len(dropped_subjects)}: {', '.join(dropped_subjects)}")
    print(f"pairs kept {stats['pairs_correct']} / dropped {stats['candidate_pairs'] - stats['pairs_correct']} "
          f"of {stats['candidate_pairs']}; prompts answered {stats['prompts_correct']} / {stats['candidate_prompts']}")
    print(json.dumps(stats))
    print(f"wrote {out}/same_subject_{{true,edit1,edit2}}.jsonl in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
