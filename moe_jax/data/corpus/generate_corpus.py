"""Writes the small English corpus behind the ``synthetic_lm_text`` task.

Every sentence is produced here from hand-written templates and word lists, so
the corpus is self-written (no third-party text) and reproducible:

  python moe_jax/data/corpus/generate_corpus.py

rewrites ``stories.txt``, ``facts.txt``, ``dialogues.txt`` and ``notes.txt``
next to this file. One line is one document (a short paragraph). The files are
committed, so nothing runs at import or test time; rerun this script only to
change the corpus (and expect the ``synthetic_lm_text`` examples to change).
"""
import os
import random

SEED = 20240611

NAMES = ["Ada", "Bram", "Cora", "Dev", "Elin", "Farid", "Greta", "Hugo",
         "Iris", "Jonah", "Kaia", "Luis", "Mira", "Nils", "Oona", "Pavel",
         "Quinn", "Rosa", "Sami", "Tove", "Umar", "Vera", "Wes", "Yara", "Zoe"]
JOBS = ["baker", "sailor", "teacher", "gardener", "carpenter", "nurse",
        "painter", "miller", "clockmaker", "librarian", "fisher", "potter",
        "weaver", "doctor", "farmer", "beekeeper", "cartographer", "tailor"]
PLACES = ["a village by the sea", "a town in the hills", "a city of bridges",
          "a farm at the edge of the forest", "a harbour town on a small island",
          "a valley full of orchards", "a quiet street near the station",
          "a house beside the old mill", "a port where the ferries stop",
          "a hamlet high in the mountains"]
OBJECTS = ["a brass key", "a blue umbrella", "an old map", "a wooden box",
           "a silver spoon", "a letter with no stamp", "a broken compass",
           "a jar of honey", "a red scarf", "a book of recipes",
           "a lantern", "a pair of boots", "a basket of pears", "a small bell",
           "a pocket watch", "a kite", "a bag of seeds", "a violin"]
FEELINGS = ["happy", "curious", "tired", "worried", "proud", "surprised",
            "calm", "hopeful", "restless", "grateful", "puzzled", "cheerful"]
WEATHER = ["rain", "snow", "fog", "wind", "sunshine", "thunder",
           "drizzle", "frost", "warm breezes", "hail"]
TIMES = ["one morning", "late in the evening", "on a Sunday",
         "at the end of summer", "in the middle of winter", "before dawn",
         "just after lunch", "on the first day of spring", "at midnight",
         "during the harvest"]
ACTIONS = ["fixed the fence", "baked fresh bread", "painted the door green",
           "planted a row of beans", "mended a fishing net",
           "wrote a long letter", "cleaned the windows", "counted the sheep",
           "tuned the old piano", "swept the yard", "sorted the books",
           "climbed the hill", "carried water from the well",
           "read by the fire", "built a small shelf", "picked apples"]
ANIMALS = {
    "fox": ("forests and fields", "mice, berries and insects", "red"),
    "owl": ("woods and barns", "mice and voles", "brown and grey"),
    "otter": ("rivers and coasts", "fish and crabs", "dark brown"),
    "hedgehog": ("gardens and hedges", "beetles and worms", "brown"),
    "heron": ("marshes and lakes", "fish and frogs", "grey"),
    "badger": ("woodland edges", "worms, roots and fruit", "black and white"),
    "swallow": ("farms and open country", "flying insects", "blue and white"),
    "seal": ("cold seas and rocky shores", "fish and squid", "grey"),
    "squirrel": ("parks and woods", "nuts and seeds", "red or grey"),
    "beaver": ("streams and ponds", "bark and water plants", "brown"),
    "crow": ("towns and fields", "almost anything", "black"),
    "tortoise": ("dry grassland", "leaves and flowers", "olive"),
}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven",
                "eight", "nine", "ten", "eleven", "twelve", "thirteen",
                "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
FOODS = ["soup", "bread", "pancakes", "stew", "porridge", "pie", "salad",
         "rice", "omelette", "dumplings", "flatbread", "jam"]
INGREDIENTS = ["flour", "milk", "eggs", "butter", "onions", "carrots",
               "potatoes", "salt", "honey", "oats", "lentils", "tomatoes",
               "apples", "cheese", "garlic", "beans", "pepper", "parsley"]
TOPICS = ["the weather", "the harvest", "the new bridge", "a lost cat",
          "the school play", "the market", "a storm at sea", "the library",
          "a broken clock", "the summer fair", "a strange noise",
          "the train timetable"]


def _a(words):
  return random.choice(words)


def _the(phrase):
  """'a brass key' -> 'the brass key'."""
  return "the " + phrase.split(" ", 1)[1]


def story():
  n1, n2 = random.sample(NAMES, 2)
  job, place, obj = _a(JOBS), _a(PLACES), _a(OBJECTS)
  lines = [
      f"{n1} was a {job} who lived in {place}.",
      f"{_a(TIMES).capitalize()}, {n1} found {obj} near the door.",
      random.choice([
          f"Nobody in the town knew where it had come from.",
          f"It was covered in dust, as if it had waited there for years.",
          f"There was a note tied to it that said only: keep me safe.",
          f"{n1} turned it over twice and felt {_a(FEELINGS)}.",
      ]),
      random.choice([
          f"The next day {n1} showed it to {n2}, who {_a(ACTIONS)} while listening.",
          f"{n2}, a {_a(JOBS)} from next door, said it reminded them of an old story.",
          f"{n1} asked {n2} for advice, but {n2} only laughed and {_a(ACTIONS)}.",
      ]),
      random.choice([
          f"In the end {n1} kept {_the(obj)} on the shelf and {_a(ACTIONS)} every week.",
          f"By the time the {_a(WEATHER)} came, {n1} had almost forgotten about it.",
          f"Years later, {n1} gave {_the(obj)} to a child who seemed {_a(FEELINGS)}.",
          f"That evening {n1} {_a(ACTIONS)} and felt {_a(FEELINGS)} for the first time in weeks.",
      ]),
  ]
  return " ".join(lines)


def number_fact():
  a, b = random.randint(0, 10), random.randint(0, 10)
  op = random.choice(["plus", "times", "minus"])
  if op == "plus":
    c = a + b
  elif op == "times":
    c = a * b
  else:
    a, b = max(a, b), min(a, b)
    c = a - b
  word = NUMBER_WORDS[c] if c <= 20 else str(c)
  extra = random.choice([
      f"{NUMBER_WORDS[a].capitalize()} is {'even' if a % 2 == 0 else 'odd'}.",
      f"The number after {NUMBER_WORDS[b]} is {NUMBER_WORDS[b + 1]}.",
      f"Counting from {NUMBER_WORDS[min(a, b)]} to {NUMBER_WORDS[max(a, b)]} "
      f"takes {NUMBER_WORDS[abs(a - b) + 1]} steps.",
      f"Twice {NUMBER_WORDS[a]} is {2 * a}.",
  ])
  return f"{NUMBER_WORDS[a].capitalize()} {op} {NUMBER_WORDS[b]} is {word}. {extra}"


def animal_fact():
  name, (home, food, colour) = random.choice(sorted(ANIMALS.items()))
  parts = [
      f"The {name} lives in {home}.",
      f"It eats {food}.",
      f"Most are {colour} in colour.",
      random.choice([
          f"A young {name} stays close to its parents for the first months.",
          f"People who watch the {name} quietly can sometimes see it at dusk.",
          f"In {_a(WEATHER)} the {name} looks for shelter.",
          f"The {name} is most active {random.choice(['at night', 'by day', 'at dawn and dusk'])}.",
      ]),
  ]
  random.shuffle(parts[1:3])
  return " ".join(parts)


def recipe():
  food = _a(FOODS)
  items = random.sample(INGREDIENTS, random.randint(3, 5))
  minutes = random.choice([10, 15, 20, 25, 30, 40, 45, 60])
  steps = [
      f"To make a simple {food}, you need {', '.join(items[:-1])} and {items[-1]}.",
      f"First, wash and prepare the {items[0]}.",
      f"Mix the {items[1]} with the {items[2]} in a large bowl.",
      f"Cook everything gently for about {minutes} minutes.",
      random.choice(["Serve it warm.", "Let it cool before serving.",
                     "It keeps for two days in a cool place.",
                     "Add a little salt at the end if you like."]),
  ]
  return " ".join(steps)


def weather_report():
  day = random.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                       "Saturday", "Sunday"])
  t1 = random.randint(-5, 30)
  t2 = t1 + random.randint(2, 9)
  return (f"On {day} expect {_a(WEATHER)} in the morning and "
          f"{_a(WEATHER)} later in the day. Temperatures will be between "
          f"{t1} and {t2} degrees. " + random.choice([
              "Take a coat if you go out early.",
              "The evening should be clear.",
              "Boats should stay in the harbour.",
              "It is a good day to hang out the washing.",
              "Roads in the hills may be slippery."]))


def dialogue():
  n1, n2 = random.sample(NAMES, 2)
  topic = _a(TOPICS)
  return " ".join([
      f'"Have you heard about {topic}?" asked {n1}.',
      f'"Only a little," said {n2}. "What happened?"',
      random.choice([
          f'"Nobody is sure yet, but everyone at the market is talking about it," said {n1}.',
          f'"I will tell you on the way home," said {n1}, picking up {_a(OBJECTS)}.',
          f'"It started {_a(TIMES)}, and it has not stopped since," said {n1}.',
      ]),
      random.choice([
          f'{n2} nodded and looked {_a(FEELINGS)}.',
          f'"Then let us go and see for ourselves," said {n2}.',
          f'"I suppose we will find out soon enough," said {n2} with a sigh.',
      ]),
  ])


def note():
  n1, n2 = random.sample(NAMES, 2)
  return " ".join([
      f"Dear {n2},",
      random.choice([
          f"thank you for {_the(_a(OBJECTS))}; it arrived safely.",
          f"I hope the {_a(WEATHER)} has not spoiled your plans.",
          f"I am writing from {_a(PLACES)}, where I have been staying this month.",
      ]),
      f"Yesterday I {_a(ACTIONS)} and then {_a(ACTIONS)}.",
      random.choice([
          f"Please tell {_a(NAMES)} that I will visit soon.",
          f"I will be back before {random.choice(['the harvest', 'winter', 'the fair', 'the end of the month'])}.",
          f"Write back when you can, and tell me about {_a(TOPICS)}.",
      ]),
      f"With best wishes, {n1}.",
  ])


FILES = {
    "stories.txt": (story, 100),
    "facts.txt": (lambda: random.choice([number_fact, animal_fact,
                                         weather_report, recipe])(), 200),
    "dialogues.txt": (dialogue, 100),
    "notes.txt": (note, 100),
}


def main():
  random.seed(SEED)
  here = os.path.dirname(os.path.abspath(__file__))
  for name, (make, count) in FILES.items():
    lines = []
    seen = set()
    while len(lines) < count:
      line = make()
      if line not in seen:
        seen.add(line)
        lines.append(line)
    with open(os.path.join(here, name), "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
