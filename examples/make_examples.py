#!/usr/bin/env python3
"""Generate the small example datasets used by `make demo`.

Everything here is written for loraforge (templates plus hand-written pieces); nothing is
copied from an existing dataset. Standard library only, and deterministic: running it twice
writes byte-identical files.

    python examples/make_examples.py            # writes next to this script
    python examples/make_examples.py --out DIR  # or somewhere else

Files written:
    pirate.jsonl      ~300 chat records, everyday questions answered by a pirate
    butler.jsonl      ~300 chat records, a different sample answered by a formal English butler
    dates.jsonl       400 chat records: human-style date -> ISO 8601 (YYYY-MM-DD)
    dates_test.jsonl  50 held-out records with dates disjoint from the training set
    prompts.txt       demo prompts (none of them appear in the persona training data)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
from pathlib import Path

SEED = 20240611
N_PERSONA = 300
N_DATES_TRAIN = 400
N_DATES_TEST = 50
DATE_INSTRUCTION = "Convert to ISO date:"

# Demo prompts: kept out of the persona training data on purpose, so the demo shows the
# style carrying over to questions the adapters have never seen.
DEMO_PROMPTS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "Why is the sky blue?",
    "What should I have for breakfast?",
    "Any tips for a job interview?",
]

# ---------------------------------------------------------------------------------------
# Question bank. Each fact is (question variants, neutral answer). The neutral answer is a
# full sentence for "fact" topics, and a bare verb phrase ("set a budget, ...") for the
# "advice" and "howto" topics, so each persona can wrap it in its own voice.
# ---------------------------------------------------------------------------------------

CAPITALS = [
    ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Portugal", "Lisbon"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Turkey", "Ankara"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Switzerland", "Bern"),
    ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("New Zealand", "Wellington"), ("Cuba", "Havana"),
    ("Colombia", "Bogota"), ("Iceland", "Reykjavik"), ("the Czech Republic", "Prague"),
    ("the Philippines", "Manila"), ("Scotland", "Edinburgh"), ("the United Kingdom", "London"),
    ("the United States", "Washington, D.C."),
]
CAPITAL_Q = [
    "What is the capital of {c}?",
    "What's the capital city of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital of {c}.",
    "Do you know the capital of {c}?",
]
CAPITAL_A = [
    "The capital of {c} is {k}.",
    "{k} is the capital of {c}.",
]

FACTS = {
    "science": [
        (["What is water made of?", "What are the parts of a water molecule?"],
         "Water is made of two hydrogen atoms and one oxygen atom."),
        (["At what temperature does water boil?", "When does water boil?"],
         "Water boils at 100 degrees Celsius at sea level."),
        (["What is the boiling point of water in Fahrenheit?"],
         "Water boils at 212 degrees Fahrenheit at sea level."),
        (["At what temperature does water freeze?", "When does water turn to ice?"],
         "Water freezes at 0 degrees Celsius."),
        (["What gas do plants take in?", "What do plants breathe in?"],
         "Plants take in carbon dioxide and give off oxygen."),
        (["What do plants need to grow?"],
         "Plants need sunlight, water, air, and nutrients from the soil."),
        (["What is the hardest natural substance?", "What is the hardest thing in nature?"],
         "Diamond is the hardest natural substance."),
        (["How fast does light travel?", "What is the speed of light?"],
         "Light travels about 300,000 kilometers every second."),
        (["What is gravity?"],
         "Gravity is the force that pulls things toward each other, like an apple toward the ground."),
        (["What makes a rainbow?", "How does a rainbow form?"],
         "A rainbow forms when raindrops bend sunlight and split it into colors."),
        (["What is lightning?"],
         "Lightning is a giant spark of electricity between the clouds and the ground."),
        (["Why does thunder happen?", "What causes thunder?"],
         "Thunder is the sound of air expanding fast when lightning heats it."),
        (["What are clouds made of?"],
         "Clouds are made of tiny drops of water or bits of ice floating in the air."),
        (["What is the chemical symbol for gold?"], "The chemical symbol for gold is Au."),
        (["What is the chemical symbol for iron?"], "The chemical symbol for iron is Fe."),
        (["What is the chemical symbol for sodium?"], "The chemical symbol for sodium is Na."),
        (["Which metal is liquid at room temperature?"],
         "Mercury is the metal that is liquid at room temperature."),
        (["What do magnets attract?", "What sticks to a magnet?"],
         "Magnets attract iron, nickel, and cobalt."),
        (["What is photosynthesis?"],
         "Photosynthesis is how plants turn sunlight, water, and carbon dioxide into food."),
        (["Why does ice float?"],
         "Ice floats because it is less dense than the liquid water around it."),
        (["What is the center of an atom called?"],
         "The center of an atom is called the nucleus."),
    ],
    "space": [
        (["What is the largest planet?", "Which planet is the biggest?"],
         "Jupiter is the largest planet in our solar system."),
        (["What is the closest star to Earth?", "Which star is nearest to us?"],
         "The closest star to Earth is the Sun."),
        (["How long does it take Earth to go around the Sun?", "How long is one orbit of the Earth?"],
         "Earth takes about 365 days to go around the Sun."),
        (["What causes the tides?", "Why does the sea have tides?"],
         "The tides are caused mostly by the pull of the Moon's gravity."),
        (["Why do we have seasons?", "What causes the seasons?"],
         "We have seasons because the Earth is tilted as it goes around the Sun."),
        (["What is the Moon?"], "The Moon is a rocky world that circles the Earth."),
        (["How many planets are in the solar system?", "How many planets are there?"],
         "There are eight planets in our solar system."),
        (["Why is Mars called the red planet?", "Which planet is the red planet?"],
         "Mars is called the red planet because of its rusty red dust."),
        (["Which planet is closest to the Sun?"], "Mercury is the planet closest to the Sun."),
        (["Which planet has the famous rings?", "Which planet has big rings?"],
         "Saturn is the planet best known for its bright rings."),
        (["What is a shooting star?"],
         "A shooting star is a small rock burning up as it falls through the air."),
        (["How long does it take sunlight to reach Earth?"],
         "Sunlight takes about eight minutes to reach the Earth."),
    ],
    "geography": [
        (["What is the largest ocean?", "Which ocean is the biggest?"],
         "The Pacific is the largest ocean on Earth."),
        (["What is the tallest mountain?", "Which mountain is the highest in the world?"],
         "Mount Everest is the tallest mountain above sea level."),
        (["What is the longest river?", "Which river is the longest in the world?"],
         "The Nile is usually named the longest river in the world."),
        (["What is the biggest desert?", "Which desert is the largest?"],
         "The Sahara is the largest hot desert, though icy Antarctica is the largest desert overall."),
        (["How many continents are there?"], "There are seven continents."),
        (["What is the smallest continent?"], "Australia is the smallest continent."),
        (["Which ocean lies between Europe and America?"],
         "The Atlantic Ocean lies between Europe and the Americas."),
        (["What is the largest country in the world?", "Which country is the biggest?"],
         "Russia is the largest country by area."),
        (["Where is the Amazon rainforest?"],
         "The Amazon rainforest is in South America, mostly in Brazil."),
        (["Which sea is so salty you can float in it?", "Why can you float so easily in the Dead Sea?"],
         "The Dead Sea is so salty that people float on it with ease."),
    ],
    "animals": [
        (["What is the largest animal?", "What is the biggest animal ever?"],
         "The blue whale is the largest animal that has ever lived."),
        (["What is the fastest land animal?"],
         "The cheetah is the fastest land animal, running over 100 kilometers per hour."),
        (["How many legs does a spider have?"], "A spider has eight legs."),
        (["How many legs does an insect have?"], "An insect has six legs."),
        (["Do whales breathe air?"],
         "Yes, whales are mammals and breathe air through a blowhole."),
        (["Is a dolphin a fish?"], "No, a dolphin is a mammal, not a fish."),
        (["How long do dogs live?", "What is a dog's lifespan?"],
         "Most dogs live about 10 to 13 years."),
        (["What do pandas eat?"], "Pandas eat almost nothing but bamboo."),
        (["Why do cats purr?"], "Cats usually purr when they feel calm and content."),
        (["Can penguins fly?"], "No, penguins cannot fly, but they are excellent swimmers."),
        (["How many hearts does an octopus have?"], "An octopus has three hearts."),
        (["What is a group of lions called?"], "A group of lions is called a pride."),
        (["What is a baby kangaroo called?"], "A baby kangaroo is called a joey."),
        (["What is a baby cow called?"], "A baby cow is called a calf."),
        (["Where do polar bears live?"],
         "Polar bears live in the Arctic, on the sea ice and cold coasts."),
        (["Are bats blind?"], "No, bats can see, and many also find their way using echoes."),
        (["How do fish breathe?"], "Fish breathe by taking oxygen from the water through their gills."),
        (["What do bees make?"], "Bees make honey and beeswax."),
        (["What is the tallest animal?"], "The giraffe is the tallest animal."),
        (["How many legs does a crab have?"], "A crab has ten legs, counting its two claws."),
        (["What does a caterpillar turn into?"], "A caterpillar turns into a butterfly or a moth."),
        (["Why do parrots talk?", "How do parrots learn to talk?"],
         "Parrots copy the sounds they hear often, including human words."),
    ],
    "body": [
        (["How many bones are in the human body?"], "An adult human has 206 bones."),
        (["How many teeth do adults have?"], "Most adults have 32 teeth, counting the wisdom teeth."),
        (["What is the largest organ of the body?"], "The skin is the largest organ of the human body."),
        (["What does the heart do?"], "The heart pumps blood around the body."),
        (["Why do we need sleep?"],
         "Sleep lets the body rest and repair, and it helps the brain store memories."),
        (["What is a normal body temperature?"], "A normal body temperature is about 37 degrees Celsius."),
        (["Which vitamin comes from sunlight?"], "Your skin makes vitamin D when it gets sunlight."),
        (["How many chambers does the heart have?"], "The human heart has four chambers."),
        (["What do lungs do?"], "The lungs take in oxygen and let out carbon dioxide."),
    ],
    "history": [
        (["Who wrote Romeo and Juliet?"], "Romeo and Juliet was written by William Shakespeare."),
        (["Who painted the Mona Lisa?"], "The Mona Lisa was painted by Leonardo da Vinci."),
        (["Who was the first person on the Moon?", "Who first walked on the Moon?"],
         "Neil Armstrong was the first person to walk on the Moon, in 1969."),
        (["When did World War II end?", "What year did the Second World War end?"],
         "World War II ended in 1945."),
        (["Who invented the telephone?"],
         "Alexander Graham Bell is credited with inventing the telephone in 1876."),
        (["Who discovered penicillin?"], "Alexander Fleming discovered penicillin in 1928."),
        (["Who was the first president of the United States?"],
         "George Washington was the first president of the United States."),
        (["How old are the pyramids of Giza?"], "The pyramids of Giza are about 4,500 years old."),
        (["What language is spoken in Brazil?"], "People in Brazil speak Portuguese."),
        (["What language do they speak in Mexico?"], "Spanish is the main language of Mexico."),
        (["What language is spoken in Austria?"], "German is the main language of Austria."),
        (["Who wrote Pride and Prejudice?"], "Pride and Prejudice was written by Jane Austen."),
        (["Who composed the Moonlight Sonata?"],
         "The Moonlight Sonata was composed by Ludwig van Beethoven."),
        (["When did the Titanic sink?", "What year did the Titanic sink?"],
         "The Titanic sank in 1912 after striking an iceberg."),
        (["Where did the Olympic Games begin?"], "The Olympic Games began in ancient Greece."),
        (["Who wrote Treasure Island?"], "Treasure Island was written by Robert Louis Stevenson."),
    ],
    "food": [
        (["What is bread made from?"], "Bread is made from flour, water, yeast, and a little salt."),
        (["Where does chocolate come from?"], "Chocolate is made from the beans of the cacao tree."),
        (["What is tofu made from?"], "Tofu is made from soybeans."),
        (["What is cheese made from?"], "Cheese is made from milk."),
        (["Is a peanut a nut?"], "No, a peanut is actually a legume, like peas and beans."),
        (["Where does coffee come from?"], "Coffee comes from the roasted seeds of the coffee plant."),
        (["What fruit is used to make wine?"], "Wine is usually made from grapes."),
        (["What is sushi?"], "Sushi is a Japanese dish of vinegared rice, often with raw fish or vegetables."),
        (["Which vitamin is in oranges?"], "Oranges are rich in vitamin C."),
        (["How do bees make honey?"], "Bees make honey from the nectar of flowers."),
        (["Is a tomato a fruit?"], "Yes, a tomato is a fruit, though we cook it like a vegetable."),
        (["What is the main ingredient in guacamole?"], "The main ingredient in guacamole is avocado."),
    ],
    "weather": [
        (["What is a hurricane?"],
         "A hurricane is a huge storm with strong winds that forms over warm ocean water."),
        (["What is fog?"], "Fog is a cloud that sits close to the ground."),
        (["Why is snow white?"], "Snow looks white because its ice crystals scatter all colors of light."),
        (["What is humidity?"], "Humidity is the amount of water vapor in the air."),
        (["What causes wind?"], "Wind is air moving from places of high pressure to places of low pressure."),
    ],
    "tech": [
        (["What is the internet?"],
         "The internet is a worldwide network that links computers so they can share information."),
        (["What does CPU stand for?"], "CPU stands for central processing unit."),
        (["What does RAM stand for?"], "RAM stands for random access memory."),
        (["What is Wi-Fi?"], "Wi-Fi is a way for devices to join a network without cables."),
        (["What is a byte?"], "A byte is a small unit of computer data made of eight bits."),
    ],
    "calendar": [
        (["How many days are in a week?"], "There are seven days in a week."),
        (["How many days are in a year?"], "A year has 365 days, or 366 in a leap year."),
        (["How many months are in a year?"], "There are twelve months in a year."),
        (["How many hours are in a day?"], "There are 24 hours in a day."),
        (["How many days are in February?"], "February has 28 days, or 29 in a leap year."),
        (["How many days does April have?"], "April has 30 days."),
        (["How many days does July have?"], "July has 31 days."),
        (["What is a leap year?"],
         "A leap year is a year with 366 days, which comes about every four years."),
        (["How many weeks are in a year?"], "A year has 52 weeks and a day or two."),
        (["How many seconds are in a minute?"], "There are 60 seconds in a minute."),
    ],
}

OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"),
             ("early", "late"), ("light", "dark"), ("open", "closed"), ("full", "empty"),
             ("loud", "quiet"), ("wet", "dry"), ("strong", "weak"), ("rich", "poor"),
             ("heavy", "light"), ("ancient", "modern"), ("brave", "cowardly"), ("shallow", "deep")]
PLURALS = [("mouse", "mice"), ("goose", "geese"), ("child", "children"), ("tooth", "teeth"),
           ("foot", "feet"), ("person", "people"), ("woman", "women"), ("cactus", "cacti"),
           ("ox", "oxen"), ("sheep", "sheep"), ("leaf", "leaves"), ("knife", "knives"),
           ("wolf", "wolves"), ("fish", "fish"), ("half", "halves")]
MEANINGS = [("enormous", "very large"), ("tiny", "very small"), ("ancient", "very old"),
            ("furious", "very angry"), ("exhausted", "very tired"), ("delighted", "very pleased"),
            ("brief", "short in time"), ("fragile", "easily broken"), ("generous", "ready to give freely"),
            ("curious", "eager to learn or know"), ("rapid", "very fast"), ("timid", "shy and easily frightened"),
            ("vast", "extremely large in area"), ("drowsy", "sleepy")]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

UNITS = [  # (small unit, big unit, factor)
    ("minutes", "hours", 60), ("seconds", "minutes", 60), ("hours", "days", 24),
    ("days", "weeks", 7), ("centimeters", "meters", 100), ("grams", "kilograms", 1000),
    ("meters", "kilometers", 1000), ("months", "years", 12), ("millimeters", "centimeters", 10),
]

HOWTO = [
    (["How do I make a cup of tea?", "What's the best way to make tea?"],
     "boil fresh water, pour it over a tea bag, let it steep for three to five minutes, and add milk if you like"),
    (["How do I tie my shoes?", "How do you tie shoelaces?"],
     "cross the laces and tuck one under, make a loop with each lace, and tie the loops together tightly"),
    (["How do I plant a seed?"],
     "press it into damp soil about twice as deep as the seed is wide, keep the soil moist, and give it light"),
    (["How do I wash my hands properly?"],
     "wet your hands, scrub them with soap for twenty seconds, rinse them well, and dry them on a clean towel"),
    (["How do I cook rice?", "What's the easiest way to cook rice?"],
     "rinse one cup of rice, simmer it covered in two cups of water for about fifteen minutes, then let it rest"),
    (["How do I make a paper airplane?"],
     "fold a sheet in half lengthwise, fold the top corners to the middle, fold down the wings, and throw it gently"),
    (["How do I change a light bulb?"],
     "switch off the power, let the old bulb cool, twist it out, and screw in a new one of the same type"),
    (["How do I iron a shirt?"],
     "start with the collar, then do the cuffs and sleeves, and finish with the body, using a warm iron"),
    (["How do I sew on a button?"],
     "thread a needle, knot the end, stitch up and down through the holes a few times, and tie it off at the back"),
    (["How do I get a stain out of a shirt?", "How do I remove a stain?"],
     "blot it at once, rinse it from the back with cold water, rub in a little soap, and wash it as usual"),
    (["How do I make a strong password?"],
     "string together several random words, add a few numbers or symbols, and never reuse it on other sites"),
    (["How do I start a campfire?"],
     "pile dry tinder under small sticks, light the tinder, and add bigger logs slowly as the flames grow"),
    (["How do I clean a window?"],
     "spray it with water and a little vinegar, wipe it with a soft cloth, and dry it with a squeegee"),
    (["How do I keep bread fresh?"],
     "keep it in a bread box or paper bag at room temperature, and freeze whatever you cannot eat in a few days"),
    (["How do I water a houseplant?"],
     "water it when the top of the soil feels dry, pour slowly until water drains out, and empty the saucer"),
    (["How do I make lemonade?"],
     "squeeze a few lemons, stir the juice into cold water with sugar to taste, and serve it over ice"),
    (["How do I fix a squeaky door?"],
     "put a few drops of oil on the hinges and swing the door back and forth to work it in"),
    (["How do I make my bed neatly?"],
     "smooth the bottom sheet, lay the top sheet and blanket over it, tuck in the sides, and plump the pillows"),
    (["How do I tie a knot that holds?", "What's a simple strong knot?"],
     "tie right over left, then left over right, and pull both ends tight to make a reef knot"),
    (["How do I pump up a bike tire?"],
     "check the pressure printed on the tire, fit the pump to the valve, pump until it feels firm, and close the valve"),
    (["How do I whistle?"],
     "wet your lips, make a small round opening, rest your tongue behind your bottom teeth, and blow gently"),
    (["How do I learn to swim?"],
     "start in shallow water, practice floating and kicking, and take lessons from a good teacher"),
    (["How do I write a thank-you note?"],
     "thank the person for the specific gift or favor, say how you will enjoy it, and sign it warmly"),
    (["How do I wrap a present?"],
     "set it on the paper, fold the paper around it, tape the edges, fold the ends in, and add a ribbon"),
    (["How do I read a map?"],
     "find the compass rose to see which way is north, check the scale for distances, and use the legend for symbols"),
    (["How do I find north without a compass?"],
     "find the North Star at night, at the end of the Little Dipper's handle, and face toward it"),
]

ADVICE = [
    (["How can I save money?", "Any tips for saving money?"],
     "set a budget, put a little aside every payday, and avoid buying things on impulse"),
    (["How can I stay healthy?", "What's the secret to staying healthy?"],
     "eat plenty of vegetables, move your body every day, and get enough rest"),
    (["How can I learn a new language?"],
     "practice a little every day, learn the common words first, and speak with native speakers when you can"),
    (["How do I stop procrastinating?"],
     "break the job into small steps, start with just five minutes, and put your phone out of reach"),
    (["How can I make new friends?"],
     "join a club or class you enjoy, ask people about themselves, and keep in touch after you meet"),
    (["How can I feel less stressed?", "I'm stressed. What should I do?"],
     "take slow deep breaths, go for a walk outside, and talk to someone you trust"),
    (["How should I study for an exam?"],
     "start early, test yourself instead of just rereading, and take short breaks"),
    (["How do I stay focused?"],
     "work in short blocks with breaks, keep your desk tidy, and silence your notifications"),
    (["What should I do if I have a cold?"],
     "rest, drink plenty of fluids, and see a doctor if it lasts more than a week"),
    (["How can I drink more water?"],
     "carry a bottle with you and have a glass of water with every meal"),
    (["What should I pack for a trip?"],
     "make a list, pack comfortable clothes in layers, and keep your papers and medicine in your carry-on"),
    (["How do I get better at cooking?"],
     "start with simple recipes, taste as you go, and cook the same dish a few times until it feels easy"),
    (["How do I keep my room tidy?"],
     "give everything a home, put things away right after using them, and tidy for five minutes each evening"),
    (["How can I be more confident?"],
     "set small goals and meet them, stand up straight, and remind yourself of what you do well"),
    (["How do I deal with a rude person?"],
     "stay calm, keep your reply short and polite, and walk away if it gets worse"),
    (["What should I do on a rainy day?"],
     "read a good book, cook something warm, or start a jigsaw puzzle"),
    (["How can I wake up earlier?"],
     "go to bed a little earlier each night and put your alarm across the room"),
    (["How do I keep a plant alive?"],
     "give it the right amount of light, water it only when the soil is dry, and never let it sit in water"),
    (["What should I do if I get lost?"],
     "stay calm, stop where you are, and ask someone for directions or check a map"),
    (["How can I remember names better?"],
     "repeat the name when you hear it, use it once in conversation, and link it to something memorable"),
    (["How can I get more exercise?"],
     "take the stairs, walk or cycle for short trips, and find a sport you actually enjoy"),
    (["How can I have a more productive day?"],
     "plan your day the night before and do the hardest task first"),
    (["How do I apologize properly?"],
     "say clearly what you did wrong, apologize without excuses, and offer to make it right"),
    (["How do I prepare for a long hike?"],
     "wear broken-in boots, pack water, snacks, and a rain jacket, and tell someone your route"),
    (["How can I spend less time on my phone?"],
     "turn off notifications, keep it in another room, and set a daily time limit"),
    (["What should I get my friend for their birthday?"],
     "choose something tied to their hobbies, or plan a day out together"),
]

# Social small talk: hand-written replies per persona. {addr} is "sir" or "madam".
SOCIAL = [
    (["Hello!", "Hi there!", "Hey!", "Hi!"],
     ["Ahoy, matey! What can this old sea dog do fer ye?",
      "Ahoy there, me hearty! Welcome aboard.",
      "Arr, hello to ye, matey! What brings ye to me ship?"],
     ["Good day, {addr}. How may I be of service?",
      "Hello, {addr}. I trust you are keeping well. How may I assist?",
      "Good day to you, {addr}. What may I do for you?"]),
    (["Good morning!", "Morning!"],
     ["Mornin', matey! The sun be up and the sea be calm.",
      "A fine mornin' to ye, me hearty! Ready to set sail?"],
     ["Good morning, {addr}. I trust you slept well.",
      "Good morning, {addr}. The newspaper has been ironed and awaits you in the study."]),
    (["Good night!", "I'm off to bed, good night."],
     ["Sleep well, matey, and may the sea rock ye gently.",
      "Good night, me hearty! Dream o' buried treasure."],
     ["Good night, {addr}. I have turned down your bed and drawn the curtains.",
      "Sleep well, {addr}. Shall I wake you at the usual hour?"]),
    (["How are you?", "How are you doing today?", "How's it going?"],
     ["Arr, I be fit as a fiddle an' ready fer adventure, matey! How be ye?",
      "Shipshape and happy, me hearty, thank ye fer askin'!"],
     ["Very well, thank you, {addr}. How may I be of service today?",
      "Quite well, {addr}, thank you for asking. I trust you are the same."]),
    (["Thank you!", "Thanks for your help.", "Thanks a lot!"],
     ["Ye be most welcome, matey! Any time ye need a hand on deck.",
      "Arr, 'twas nothin', me hearty!"],
     ["You are most welcome, {addr}. It is my pleasure.",
      "Not at all, {addr}. I am always at your service."]),
    (["Goodbye!", "See you later!", "Bye for now."],
     ["Fair winds to ye, matey, until we meet again!",
      "Farewell, me hearty! May yer sails stay full."],
     ["Goodbye, {addr}. Shall I fetch your coat?",
      "Until later, {addr}. I shall see that all is in order upon your return."]),
    (["What is your name?", "Who are you?"],
     ["Arr, I be a humble pirate o' the seven seas, matey, here to help ye.",
      "They call me the old sea dog, me hearty, and I be at yer service!"],
     ["I am your butler, {addr}, here to attend to your every need.",
      "Merely your humble butler, {addr}. How may I be of service?"]),
    (["Nice to meet you.", "Pleased to meet you!"],
     ["Likewise, me hearty! Any friend o' the sea be a friend o' mine.",
      "Arr, the pleasure be all mine, matey!"],
     ["The pleasure is entirely mine, {addr}.",
      "Delighted, {addr}. I hope I may be of some use to you."]),
    (["Can you help me?", "I need some help.", "Could you help me with something?"],
     ["Aye, matey! Tell me what troubles ye and we'll chart a course together.",
      "Arr, that I can, me hearty! Speak up and I'll lend ye a hand."],
     ["Certainly, {addr}. How may I be of assistance?",
      "Of course, {addr}. I am entirely at your disposal."]),
    (["Tell me a joke.", "Do you know any jokes?", "Make me laugh."],
     ["Arr, why couldn't the pirate learn the alphabet? He kept gettin' lost at C!",
      "Why did the pirate never finish his map, matey? He kept losin' the plot!"],
     ["If you insist, {addr}: the scarecrow won an award because he was outstanding in his field.",
      "Very good, {addr}. I am told the skeleton stayed home from the ball because he had no body to go with."]),
    (["I'm bored.", "I have nothing to do."],
     ["Arr, a bored sailor be a useless sailor! Go swab the deck or hunt fer treasure, matey.",
      "Then find an adventure, me hearty: read a tale o' the high seas or explore somewhere new!"],
     ["Might I suggest a stroll in the garden, {addr}, or perhaps a good book from the library?",
      "If I may, {addr}, a game of chess or a brisk walk might lift the spirits."]),
    (["I feel sad today.", "I'm feeling a bit down."],
     ["Arr, even the stormiest seas turn calm, matey. Talk to a friend and let the sun back in.",
      "Chin up, me hearty! Every storm passes, and ye've got a crew that cares fer ye."],
     ["I am very sorry to hear that, {addr}. Perhaps a cup of tea and a quiet word with a friend might help.",
      "My sympathies, {addr}. Might I bring you a cup of tea and open a window for some fresh air?"]),
    (["I'm so tired.", "I feel exhausted."],
     ["Then drop anchor and rest, matey! Even the best crew needs shore leave.",
      "Arr, get ye to yer hammock, me hearty, and sleep till the next tide."],
     ["Then I shall draw you a warm bath, {addr}, and see that you are not disturbed.",
      "Might I suggest an early night, {addr}? I shall turn down the bed at once."]),
    (["I passed my exam!", "I got the job!", "It's my birthday today!"],
     ["Shiver me timbers, that be grand news, matey! Let's celebrate wi' a barrel o' grog!",
      "Yo ho ho! Well done, me hearty, ye've earned yer share o' the treasure!"],
     ["Splendid news, {addr}. May I offer my warmest congratulations?",
      "How very splendid, {addr}. Shall I put a bottle of something on ice?"]),
    (["What's the weather like today?", "Is it going to rain today?"],
     ["Arr, I can't see the sky from here, matey, but check a forecast afore ye set sail.",
      "Sniff the wind and look to the clouds, me hearty, or just check a weather report!"],
     ["I am afraid I cannot see outside from here, {addr}, but I would advise an umbrella just in case.",
      "I regret I cannot say, {addr}. A glance at the forecast would settle the matter."]),
    (["What time is it?", "Do you know the time?"],
     ["Arr, I've no clock on this ship, matey; check yer watch or the sun in the sky.",
      "Time be measured in tides on me ship, me hearty! Best check yer own clock."],
     ["I am afraid I have no clock to hand, {addr}; your phone should tell you precisely.",
      "I regret I cannot see a clock from here, {addr}, but your watch will know."]),
    (["Do you like the sea?", "Do you enjoy sailing?"],
     ["Like it? Arr, the sea be me home, me heart, and me whole world, matey!",
      "Aye, nothin' beats the salt spray and a full sail, me hearty!"],
     ["I prefer dry land, {addr}, though I do admire a sea view from the terrace.",
      "A sea view from the drawing room suits me admirably, {addr}."]),
    (["What's your favorite food?", "What do you like to eat?"],
     ["Arr, nothin' beats salt fish and hardtack, matey, washed down wi' a tot o' grog!",
      "Roast chicken after a long voyage, me hearty, and plenty of it!"],
     ["I could not possibly say, {addr}; my tastes are entirely secondary to yours.",
      "A modest cucumber sandwich suits me well, {addr}, though I would never presume."]),
]

# ---------------------------------------------------------------------------------------
# Persona voices
# ---------------------------------------------------------------------------------------

PIRATE_OPEN = ["Arr, matey", "Aye, matey", "Ahoy, me hearty", "Arr, me hearty", "Yo ho ho, matey",
               "Shiver me timbers", "Avast, ye landlubber", "Aye, me hearty", "Arr"]
PIRATE_TAGS = {
    "geography": ["Mark it well on yer treasure map!", "Every sailor worth his salt knows that.",
                  "Chart it well, matey!", "I've heard that from many a sailor in port."],
    "capital": ["Mark it well on yer treasure map!", "Every sailor worth his salt knows that.",
                "Chart it well, matey!", "Even me parrot knows that one."],
    "science": ["As sure as the tide comes in!", "Every old salt knows that.",
                "True as a compass pointin' north!", "That be the way o' the world, matey."],
    "space": ["I learned that from the stars on many a night watch.", "As sure as the tide comes in!",
              "A sailor steers by the heavens, so trust me on that."],
    "weather": ["Every old salt knows the weather, matey!", "Ye learn that fast on the open sea."],
    "animals": ["Nature be full o' wonders, matey!", "Stranger than a sea serpent, that!",
                "Even me parrot knows that one."],
    "body": ["Keep yer body shipshape, matey!", "Even an old sea dog needs to know that."],
    "history": ["That be a tale worth tellin'!", "Every sailor worth his salt knows that.",
                "Even me parrot knows that one."],
    "food": ["Fine grub fer any crew!", "Better than ship's biscuit, that be!"],
    "tech": ["Strange magic fer an old sea dog like me!", "Newfangled stuff, but true as a compass."],
    "words": ["Even me parrot knows that one.", "Mind yer words on deck, matey!",
              "A pirate knows his words as well as his knots."],
    "calendar": ["Count yer days at sea and ye'll see!", "Every ship's log agrees, matey."],
    "math": ["Count yer doubloons if ye doubt me!", "Sure as I count me gold!",
             "Even me parrot can reckon that."],
    "units": ["Count yer doubloons if ye doubt me!", "Every ship's log agrees, matey."],
    "howto": ["Steady as she goes!", "Easy as hoistin' the mainsail!", "Ye'll be shipshape in no time."],
    "advice": ["That be the pirate's way!", "Trust an old sea dog on that.", "Smooth sailin' from there, matey!"],
}

BUTLER_OPEN = ["Certainly, {addr}.", "Very good, {addr}.", "Of course, {addr}.", "Indeed, {addr}.",
               "An excellent question, {addr}."]
BUTLER_LEAD = ["If I may, {addr},", "I believe, {addr},", "I am given to understand, {addr}, that"]
BUTLER_TAGS = {
    "_": ["Will there be anything else, {addr}?", "I trust that is of some assistance, {addr}.",
          "Do let me know if you require anything further, {addr}."],
    "capital": ["Shall I fetch the atlas from the library, {addr}?"],
    "geography": ["Shall I fetch the atlas from the library, {addr}?"],
    "science": ["A most remarkable fact, if I may say so."],
    "space": ["A most remarkable fact, if I may say so."],
    "food": ["Shall I have a word with cook, {addr}?"],
    "math": ["I have checked the figures twice, {addr}."],
    "units": ["I have checked the figures twice, {addr}."],
    "howto": ["Or, if you prefer, {addr}, I should be happy to see to it myself."],
    "advice": ["If I may say so, {addr}, it has always served me well."],
}
BUTLER_HOWTO = ["{o} One should simply {c}.", "{o} I would recommend that you {c}.",
                "{o} You need only {c}.", "If I may, {addr}, you need only {c}."]
BUTLER_ADVICE = ["If I may suggest, {addr}, it would be wise to {c}.",
                 "Might I suggest, {addr}, that you {c}.",
                 "If I may be so bold, {addr}, I would {c}.",
                 "{o} I would recommend that you {c}."]
PIRATE_HOWTO = ["{o}, {c}.", "{o}, 'tis easy: {c}.", "Here be how, matey: {c}."]
PIRATE_ADVICE = ["{o}, ye'd best {c}.", "{o}, take it from an old sea dog: {c}.",
                 "{o}, here be me advice: {c}."]

PIRATE_WORDS = {
    "is": "be", "are": "be", "you": "ye", "your": "yer", "yours": "yers", "you're": "ye be",
    "you'll": "ye'll", "you'd": "ye'd", "yourself": "yerself", "my": "me", "yes": "aye",
    "hello": "ahoy", "friend": "matey", "friends": "mateys", "it's": "'tis", "isn't": "ain't",
    "aren't": "ain't", "of": "o'", "and": "an'", "for": "fer", "with": "wi'",
}
NO_DROP_G = ("string", "spring")


def _match_case(src: str, dst: str) -> str:
    return dst[:1].upper() + dst[1:] if src[:1].isupper() else dst


def piratize(text: str) -> str:
    """Light pirate dialect for neutral text: 'you are' -> 'ye be', 'boiling' -> 'boilin''."""
    def word(m: re.Match) -> str:
        w = m.group(0)
        low = w.lower()
        if low in PIRATE_WORDS:
            return _match_case(w, PIRATE_WORDS[low])
        if len(w) >= 6 and w.islower() and w.endswith("ing") and w not in NO_DROP_G:
            return w[:-1] + "'"
        return w
    return re.sub(r"[A-Za-z]+(?:'[a-z]+)?", word, text)


# First words that are proper nouns (or acronyms) keep their capital when a reply starts
# with an interjection, e.g. "Arr, Jupiter be ..." but "Arr, the capital o' ...".
def _lower_first(s: str) -> str:
    first = s.split()[0].rstrip(",")
    if (len(first) > 1 and first.isupper()) or first in _PROPER_STARTS or first[0].isdigit():
        return s
    return s[0].lower() + s[1:]


_PROPER_STARTS = {k for _, k in CAPITALS} | {k.split()[0] for _, k in CAPITALS} | {
    "Jupiter", "Earth", "Mars", "Saturn", "Mount", "Australia", "Russia", "Romeo", "Neil", "World",
    "Alexander", "George", "Spanish", "German", "Pride", "Treasure", "Wi-Fi", "Wi",
} | set(MONTHS) | set(WEEKDAYS)


def pirate_reply(rng: random.Random, topic: str, kind: str, core: str) -> str:
    o = rng.choice(PIRATE_OPEN)
    c = piratize(core)
    if kind == "fact":
        text = f"{o}, {_lower_first(c)}"
    elif kind == "howto":
        text = rng.choice(PIRATE_HOWTO).format(o=o, c=c)
    else:
        text = rng.choice(PIRATE_ADVICE).format(o=o, c=c)
    if rng.random() < 0.6:
        tags = [t for t in PIRATE_TAGS[topic] if not ("matey" in t and "matey" in text)]
        if tags:
            text += " " + rng.choice(tags)
    return text


def butler_reply(rng: random.Random, topic: str, kind: str, core: str, addr: str) -> str:
    o = rng.choice(BUTLER_OPEN).format(addr=addr)
    if kind == "fact":
        if rng.random() < 0.35:
            leads = BUTLER_LEAD if topic not in ("math", "units", "calendar", "words") else BUTLER_LEAD[:2]
            text = f"{rng.choice(leads).format(addr=addr)} {_lower_first(core)}"
        else:
            text = f"{o} {core}"
    elif kind == "howto":
        text = rng.choice(BUTLER_HOWTO).format(o=o, c=core, addr=addr)
    else:
        text = rng.choice(BUTLER_ADVICE).format(o=o, c=core, addr=addr)
    if rng.random() < 0.35:
        pool = BUTLER_TAGS.get(topic, []) + BUTLER_TAGS["_"]
        text += " " + rng.choice(pool).format(addr=addr)
    return text


# ---------------------------------------------------------------------------------------
# Building the question pool
# ---------------------------------------------------------------------------------------

def _math_items(rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    out, seen = [], set()
    while len(out) < n:
        op = rng.choice(["plus", "minus", "times", "half"])
        if op == "plus":
            a, b = rng.randint(2, 60), rng.randint(2, 40)
            q = rng.choice(["What is {a} plus {b}?", "What's {a} + {b}?", "Can you add {a} and {b}?"])
            core = f"{a} plus {b} is {a + b}."
        elif op == "minus":
            a = rng.randint(10, 90)
            b = rng.randint(1, a - 1)
            q = rng.choice(["What is {a} minus {b}?", "What's {a} - {b}?", "What do I get if I take {b} from {a}?"])
            core = f"{a} minus {b} is {a - b}."
        elif op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q = rng.choice(["What is {a} times {b}?", "What's {a} x {b}?", "How much is {a} multiplied by {b}?"])
            core = f"{a} times {b} is {a * b}."
        else:
            a, b = 2 * rng.randint(5, 100), 0
            q = rng.choice(["What is half of {a}?", "What's half of {a}?"])
            core = f"Half of {a} is {a // 2}."
        q = q.format(a=a, b=b)
        if q not in seen:
            seen.add(q)
            out.append(("math", "fact", q, core))
    return out


def _unit_items(rng: random.Random, n: int) -> list[tuple[str, str, str, str]]:
    out, seen = [], set()
    while len(out) < n:
        small, big, f = rng.choice(UNITS)
        k = rng.randint(2, 12)
        q = rng.choice(["How many {s} are in {k} {b}?", "How many {s} make {k} {b}?"]).format(s=small, k=k, b=big)
        if q in seen:
            continue
        seen.add(q)
        out.append(("units", "fact", q, f"There are {k * f:,} {small} in {k} {big}."))
    return out


def _word_items(rng: random.Random) -> list[tuple[str, str, str, str]]:
    out = []
    for a, b in OPPOSITES:
        q = rng.choice(["What is the opposite of {a}?", "What's the opposite of '{a}'?"]).format(a=a)
        out.append(("words", "fact", q, f"The opposite of '{a}' is '{b}'."))
    for a, b in PLURALS:
        q = rng.choice(["What is the plural of {a}?", "What's the plural of '{a}'?"]).format(a=a)
        core = f"The plural of '{a}' is '{b}'." if a != b else f"The plural of '{a}' is also '{b}'."
        out.append(("words", "fact", q, core))
    for a, b in MEANINGS:
        q = rng.choice(["What does '{a}' mean?", "What is the meaning of the word {a}?"]).format(a=a)
        out.append(("words", "fact", q, f"The word '{a}' means {b}."))
    return out


def _month_items(rng: random.Random) -> list[tuple[str, str, str, str]]:
    out = []
    for i, m in enumerate(MONTHS):
        nxt = MONTHS[(i + 1) % 12]
        out.append(("calendar", "fact", f"Which month comes after {m}?", f"{nxt} comes after {m}."))
    for i, d in enumerate(WEEKDAYS):
        nxt = WEEKDAYS[(i + 1) % 7]
        out.append(("calendar", "fact", f"What day comes after {d}?", f"The day after {d} is {nxt}."))
    return out


def _pick(rng: random.Random, variants: list[str]) -> str:
    q = rng.choice(variants)
    r = rng.random()
    if r < 0.08 and q.endswith("?"):
        q = "Quick question: " + _lower_first(q)
    elif r < 0.14 and q.endswith("?"):
        q = "Hey, " + q[0].lower() + q[1:] if not q.split()[0] == "I" else q
    return q


def persona_records(rng: random.Random, persona: str) -> list[dict]:
    """One sample of ~N_PERSONA questions, mixed across topics, answered in `persona`'s voice."""
    items: list[tuple[str, str, str, str]] = []  # (topic, kind, question, neutral core)

    caps = rng.sample(CAPITALS, 32)
    for c, k in caps:
        q = rng.choice(CAPITAL_Q).format(c=c)
        core = rng.choice(CAPITAL_A).format(c=c, k=k)
        core = core[0].upper() + core[1:]
        items.append(("capital", "fact", q, core))

    facts = [(t, v, a) for t, lst in FACTS.items() for v, a in lst]
    for t, v, a in rng.sample(facts, 88):
        items.append((t, "fact", _pick(rng, v), a))

    items += rng.sample(_word_items(rng), 30)
    items += rng.sample(_month_items(rng), 10)
    items += _math_items(rng, 32)
    items += _unit_items(rng, 20)
    for v, a in rng.sample(HOWTO, 24):
        items.append(("howto", "howto", _pick(rng, v), a))
    for v, a in rng.sample(ADVICE, 24):
        items.append(("advice", "advice", _pick(rng, v), a))

    records = []
    for topic, kind, q, core in items:
        if persona == "pirate":
            a = pirate_reply(rng, topic, kind, core)
        else:
            a = butler_reply(rng, topic, kind, core, rng.choice(["sir", "madam"]))
        records.append((q, a))

    # Small talk: several phrasings of each, hand-written replies.
    social = []
    for qs, pir, but in SOCIAL:
        for q in qs:
            addr = rng.choice(["sir", "madam"])
            social.append((q, rng.choice(pir) if persona == "pirate" else rng.choice(but).format(addr=addr)))
    records += rng.sample(social, N_PERSONA - len(records))

    rng.shuffle(records)
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in records]


# ---------------------------------------------------------------------------------------
# Dates: human style -> ISO 8601
# ---------------------------------------------------------------------------------------

def _ord(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th') }"


def _abbr(m: int, dot: bool = False) -> str:
    name = MONTHS[m - 1]
    if len(name) <= 4:  # May, June, July: written in full
        return name
    a = "Sept" if m == 9 and dot else name[:3]
    return a + ("." if dot else "")


DATE_STYLES = [
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {_ord(d.day)}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{_ord(d.day)} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{_abbr(d.month)} {d.day} {d.year}",
    lambda d: f"{_abbr(d.month, dot=True)} {d.day}, {d.year}",
    lambda d: f"the {_ord(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()][:3]} {d.day} {_abbr(d.month)} {d.year}",
    lambda d: f"{d.day:02d}-{_abbr(d.month)}-{d.year}",
    lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day} {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]} the {_ord(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{d.day:02d} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1].lower()} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1].upper()} {d.day}, {d.year}",
    lambda d: f"{_abbr(d.month)} {_ord(d.day)} {d.year}",
]


def date_records(rng: random.Random, dates: list[dt.date]) -> list[dict]:
    styles = []
    while len(styles) < len(dates):
        block = list(range(len(DATE_STYLES)))
        rng.shuffle(block)
        styles += block
    out = []
    for d, s in zip(dates, styles, strict=False):
        text = DATE_STYLES[s](d)
        out.append({"messages": [{"role": "user", "content": f"{DATE_INSTRUCTION} {text}"},
                                 {"role": "assistant", "content": d.isoformat()}]})
    return out


def make_dates(rng: random.Random) -> tuple[list[dict], list[dict]]:
    lo, hi = dt.date(1950, 1, 1).toordinal(), dt.date(2049, 12, 31).toordinal()
    picked = rng.sample(range(lo, hi + 1), N_DATES_TRAIN + N_DATES_TEST)  # distinct days
    days = [dt.date.fromordinal(o) for o in picked]
    train, test = days[:N_DATES_TRAIN], days[N_DATES_TRAIN:]
    return date_records(rng, train), date_records(rng, test)


# ---------------------------------------------------------------------------------------

def write_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(SEED)
    pirate = persona_records(random.Random(rng.random()), "pirate")
    butler = persona_records(random.Random(rng.random()), "butler")
    train, test = make_dates(random.Random(rng.random()))

    demo = {p.lower() for p in DEMO_PROMPTS}
    for recs in (pirate, butler):
        assert len(recs) == N_PERSONA
        assert not any(r["messages"][0]["content"].lower() in demo for r in recs)
    assert not ({r["messages"][1]["content"] for r in train} & {r["messages"][1]["content"] for r in test})

    write_jsonl(args.out / "pirate.jsonl", pirate)
    write_jsonl(args.out / "butler.jsonl", butler)
    write_jsonl(args.out / "dates.jsonl", train)
    write_jsonl(args.out / "dates_test.jsonl", test)
    (args.out / "prompts.txt").write_text("\n".join(DEMO_PROMPTS) + "\n", encoding="utf-8")
    for name, n in [("pirate.jsonl", len(pirate)), ("butler.jsonl", len(butler)),
                    ("dates.jsonl", len(train)), ("dates_test.jsonl", len(test)),
                    ("prompts.txt", len(DEMO_PROMPTS))]:
        print(f"wrote {args.out / name} ({n} lines)")


if __name__ == "__main__":
    main()
