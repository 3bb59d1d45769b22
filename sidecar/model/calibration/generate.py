"""Writes ``pairs.jsonl``, the calibration set that ships with the sidecar (``python -m
sidecar.model.calibration.generate``; a test fails when the file and this script drift apart).

Source: the 101 topics below, each a search query and a passage that answers it, were written for this
project in plain general-knowledge English (no dataset, no benchmark queries). Each query is paired
three times, so the calibrated activations cover what a reranker sees: with its own passage (relevant),
with another topic's passage (irrelevant), and with three passages run together (a long, mostly
irrelevant candidate of the length the batcher's common pairs have). The choice of partners is fixed
arithmetic on the topic's index, so the file is the same on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

PAIRS_FILE = Path(__file__).with_name("pairs.jsonl")

TOPICS: tuple[tuple[str, str], ...] = (
    (
        "why is the sky blue",
        "Sunlight scatters off the molecules of the air, and short blue wavelengths scatter far more than red ones, so blue light reaches the eye from every part of the sky.",
    ),
    (
        "how do plants make food",
        "Plants use photosynthesis: chlorophyll in their leaves captures sunlight, which drives the reaction that turns carbon dioxide and water into sugar and releases oxygen.",
    ),
    (
        "what is the boiling point of water at altitude",
        "Water boils at a lower temperature in the mountains because the air pressure is lower; at 3,000 metres it boils at roughly 90 degrees Celsius, so food cooks more slowly.",
    ),
    (
        "how long should I boil an egg",
        "For a soft yolk, lower the egg into boiling water for six minutes; for a firm yolk, cook it for nine to ten minutes, then cool it in cold water so it peels easily.",
    ),
    (
        "what causes thunder",
        "Lightning heats the air along its path to several times the temperature of the sun's surface in a fraction of a second; the air expands violently and the shock wave is heard as thunder.",
    ),
    (
        "how do I reset a router",
        "Most home routers reset when you hold a small recessed button on the back for about ten seconds with a paperclip; the lights flash and the device returns to its factory settings.",
    ),
    (
        "benefits of regular walking",
        "Walking thirty minutes a day lowers blood pressure, improves mood and sleep, strengthens bones, and reduces the risk of heart disease and type 2 diabetes.",
    ),
    (
        "how do bees make honey",
        "Bees collect nectar from flowers, store it in a honey stomach where enzymes begin to break down its sugars, then spread it in wax cells and fan it with their wings until the water evaporates.",
    ),
    (
        "what is inflation",
        "Inflation is the general rise of prices over time, which lowers what a unit of money can buy; central banks usually aim to keep it near two percent a year.",
    ),
    (
        "how does compound interest work",
        "Compound interest is earned on both the original deposit and on the interest already added, so savings grow faster each year the longer they are left untouched.",
    ),
    (
        "when did the Roman Empire fall",
        "The Western Roman Empire is usually said to have ended in 476, when the last emperor in Italy was deposed; the Eastern Empire lasted until the fall of Constantinople in 1453.",
    ),
    (
        "how to remove a coffee stain",
        "Blot a fresh coffee stain, rinse it from the back with cold water, then work in a little liquid detergent and wash as usual; hot water can set the stain.",
    ),
    (
        "what do pandas eat",
        "Giant pandas eat almost nothing but bamboo, up to forty kilograms a day, although their digestive system is that of a carnivore and absorbs little of it.",
    ),
    (
        "why do leaves change color in autumn",
        "As days shorten, trees stop making chlorophyll; the green fades and reveals yellow and orange pigments, while some species also make red pigments from trapped sugars.",
    ),
    (
        "how far away is the moon",
        "The moon orbits at an average distance of about 384,400 kilometres from the earth; light covers that distance in a little more than a second.",
    ),
    (
        "how to start running as a beginner",
        "Begin with short intervals of running and walking three times a week, increase the running time gradually, and keep an easy pace at which you could still hold a conversation.",
    ),
    (
        "what is a black hole",
        "A black hole is a region where gravity is so strong that nothing, not even light, can escape; it forms when a massive star collapses at the end of its life.",
    ),
    (
        "how do noise cancelling headphones work",
        "Microphones on the ear cups pick up outside sound, and the headphones play the same wave inverted, so the two cancel out before they reach the ear.",
    ),
    (
        "what is the capital of Australia",
        "Canberra is the capital of Australia; it was chosen as a compromise between Sydney and Melbourne and purpose-built as the seat of government in the early twentieth century.",
    ),
    (
        "how to keep bread fresh longer",
        "Keep bread at room temperature in a paper or cloth bag for a few days, or slice and freeze it; the refrigerator makes it go stale faster.",
    ),
    (
        "why do we dream",
        "Scientists still debate why we dream; leading ideas are that dreaming helps consolidate memories, process emotions and simulate threats, mostly during rapid eye movement sleep.",
    ),
    (
        "how does a refrigerator keep food cold",
        "A refrigerator pumps a refrigerant through coils: it evaporates inside, absorbing heat from the food compartment, and condenses in the coils at the back, releasing that heat into the room.",
    ),
    (
        "what is the largest ocean",
        "The Pacific is the largest and deepest ocean, covering about a third of the earth's surface and holding the Mariana Trench, nearly eleven kilometres deep.",
    ),
    (
        "how to improve handwriting",
        "Slow down, hold the pen loosely, sit up straight and practise letter shapes a few minutes each day; consistent size and spacing matter more than style.",
    ),
    (
        "how do vaccines get approved",
        "A vaccine passes laboratory studies and three phases of clinical trials in growing numbers of volunteers before a regulator reviews the evidence on safety and effectiveness.",
    ),
    (
        "what are the symptoms of dehydration",
        "Thirst, dark urine, headache, tiredness and dizziness are early signs of dehydration; severe cases bring confusion and a rapid heartbeat and need urgent care.",
    ),
    (
        "who invented the telephone",
        "Alexander Graham Bell received the first patent for the telephone in 1876, although Elisha Gray and Antonio Meucci worked on similar devices at the same time.",
    ),
    (
        "how to care for a cactus",
        "Give a cactus bright light, water it thoroughly only when the soil is completely dry, use a free-draining gritty mix, and water even less in winter.",
    ),
    (
        "what is machine learning",
        "Machine learning is a branch of computing in which programs learn patterns from examples rather than following hand-written rules, and improve as they see more data.",
    ),
    (
        "how do tides work",
        "Tides are caused mainly by the moon's gravity pulling the oceans into two bulges, one facing the moon and one opposite, which the earth rotates through twice a day.",
    ),
    (
        "why is exercise good for the brain",
        "Exercise increases blood flow to the brain, promotes the growth of new connections, and is linked to better memory and a lower risk of dementia in later life.",
    ),
    (
        "how to write a cover letter",
        "A good cover letter is short, names the job, explains in two or three paragraphs why your experience fits it, and ends by asking for an interview.",
    ),
    (
        "what is the speed of sound",
        "Sound travels through air at about 343 metres per second at room temperature, faster in water and faster still in steel.",
    ),
    (
        "how do electric cars work",
        "An electric car stores energy in a large battery pack that powers one or more electric motors; braking recovers some energy by running the motors as generators.",
    ),
    (
        "what causes earthquakes",
        "Most earthquakes happen when stress builds along faults between tectonic plates until the rock suddenly slips, releasing energy as seismic waves.",
    ),
    (
        "how to make a sourdough starter",
        "Mix equal weights of flour and water in a jar, discard half and feed it fresh flour and water every day; after about a week of bubbling it is ready to raise bread.",
    ),
    (
        "what is the function of the liver",
        "The liver filters toxins from the blood, makes bile to digest fats, stores sugar as glycogen, and produces proteins that help the blood clot.",
    ),
    (
        "how many bones are in the human body",
        "An adult human skeleton has 206 bones; babies are born with around 270, and many fuse together as they grow.",
    ),
    (
        "why do cats purr",
        "Cats purr by vibrating the muscles of the larynx as they breathe; they purr when content, but also when stressed or injured, and the sound may help healing.",
    ),
    (
        "how does a bill become law",
        "In many parliaments a bill is debated and amended in committee, voted on in each chamber, and becomes law once it receives the head of state's assent.",
    ),
    (
        "what is the greenhouse effect",
        "Gases such as carbon dioxide and methane let sunlight through but absorb the heat the earth radiates back, keeping the surface warmer than it would otherwise be.",
    ),
    (
        "how to negotiate a salary",
        "Research the going rate for the role, let the employer name a figure first where possible, and justify your request with the value you bring rather than personal needs.",
    ),
    (
        "what is a healthy resting heart rate",
        "For most adults a resting heart rate between 60 and 100 beats per minute is normal; well-trained athletes often rest below 60.",
    ),
    (
        "how do solar panels generate electricity",
        "Solar cells are made of silicon layers; when light strikes them it frees electrons, and the electric field between the layers drives those electrons through a circuit as current.",
    ),
    (
        "who wrote Pride and Prejudice",
        "Pride and Prejudice was written by Jane Austen and published in 1813; it follows Elizabeth Bennet and her changing opinion of the proud Mr Darcy.",
    ),
    (
        "how to clean a cast iron pan",
        "Rinse a cast iron pan with hot water and a brush while it is warm, dry it on the stove, and wipe on a thin coat of oil to keep the seasoning.",
    ),
    (
        "what is the difference between weather and climate",
        "Weather is the state of the atmosphere over hours or days, while climate is the average pattern of weather in a region over thirty years or more.",
    ),
    (
        "how do birds migrate",
        "Migrating birds navigate using the position of the sun and stars, the earth's magnetic field, and landmarks, often flying thousands of kilometres between breeding and wintering grounds.",
    ),
    (
        "what is an index fund",
        "An index fund holds the shares of every company in a market index, such as the largest firms on an exchange, offering broad diversification at low cost.",
    ),
    (
        "how to fall asleep faster",
        "Keep a regular bedtime, avoid screens and caffeine in the evening, keep the bedroom cool and dark, and get up if you lie awake for more than twenty minutes.",
    ),
    (
        "how are rainbows formed",
        "A rainbow appears when sunlight enters raindrops, bends, reflects off the back of each drop and bends again on leaving, splitting white light into its colours.",
    ),
    (
        "what is the population of the world",
        "The world's population passed eight billion people in 2022, having doubled since the mid 1970s; growth is now slowing in most regions.",
    ),
    (
        "how does the stock market work",
        "A stock market is where shares of companies are bought and sold; prices move with supply and demand, reflecting what investors expect of each company's future profits.",
    ),
    (
        "why do onions make you cry",
        "Cutting an onion breaks its cells and releases enzymes that produce a volatile sulphur compound; it reaches the eyes and irritates them, so they make tears.",
    ),
    (
        "how to learn a new language",
        "Daily practice works best: learn common words first, listen to native speakers, speak early even with mistakes, and review vocabulary with spaced repetition.",
    ),
    (
        "what is DNA",
        "DNA is the molecule that carries genetic instructions in living things: two strands twisted into a double helix, with a sequence of four bases that encodes proteins.",
    ),
    (
        "how does a microwave oven heat food",
        "A microwave oven produces radio waves that make water molecules in food rotate rapidly; the friction of that motion heats the food from within.",
    ),
    (
        "what is the tallest mountain in the world",
        "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level at about 8,849 metres.",
    ),
    (
        "how to train a puppy to sit",
        "Hold a treat above the puppy's nose and move it back over the head; as its bottom lowers, say sit and reward it at once, repeating in short sessions.",
    ),
    (
        "what is the immune system",
        "The immune system is the body's defence against infection: white blood cells, antibodies and organs such as the spleen and lymph nodes that recognise and destroy invaders.",
    ),
    (
        "how do airplanes stay in the air",
        "An aeroplane's wings are shaped and angled so that air flowing over them is deflected downward, producing lift that balances the weight of the aircraft.",
    ),
    (
        "why is the ocean salty",
        "Rain slowly dissolves minerals from rocks and rivers carry them to the sea; when seawater evaporates the salts stay behind, so over millions of years they have accumulated.",
    ),
    (
        "how to budget money each month",
        "List your income, subtract fixed bills and savings first, then divide what remains among food, transport and spending, and track every expense for a month.",
    ),
    (
        "what is the printing press",
        "Johannes Gutenberg's printing press of around 1440 used movable metal type and oil-based ink, making books far cheaper and spreading literacy across Europe.",
    ),
    (
        "how does caffeine affect the body",
        "Caffeine blocks the brain's adenosine receptors, reducing tiredness and raising alertness; too much causes jitteriness, a racing heart and poor sleep.",
    ),
    (
        "what is recycling",
        "Recycling turns used materials such as paper, glass, metal and some plastics into new products, saving raw materials and energy and reducing landfill.",
    ),
    (
        "how to grow tomatoes",
        "Plant tomatoes in full sun after the last frost, water deeply and regularly, support them with stakes or cages, and feed them once the first fruits form.",
    ),
    (
        "what are the planets in the solar system",
        "The eight planets, from the sun outward, are Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune; Pluto was reclassified as a dwarf planet in 2006.",
    ),
    (
        "how does a credit score work",
        "A credit score summarises how reliably someone has repaid debts; paying on time, keeping balances low and having a long credit history raise it.",
    ),
    (
        "what is the Great Wall of China",
        "The Great Wall is a series of fortifications built over centuries to protect Chinese states from northern invaders; most of what stands today dates from the Ming dynasty.",
    ),
    (
        "how to deal with stress",
        "Regular exercise, enough sleep, talking to someone you trust, breathing exercises and breaking problems into small steps all help to manage stress.",
    ),
    (
        "what is a volcano",
        "A volcano is an opening in the earth's crust through which molten rock, ash and gases escape; many form where tectonic plates meet or over hot spots.",
    ),
    (
        "how does wifi work",
        "Wi-Fi sends data between devices and a router using radio waves, usually in the 2.4 and 5 gigahertz bands, which the router connects to the internet.",
    ),
    (
        "why do we need vitamin C",
        "Vitamin C helps the body make collagen, absorb iron and heal wounds; a long lack of it causes scurvy, with bleeding gums and fatigue.",
    ),
    (
        "how to paint a room",
        "Clean and fill the walls, protect the floor, cut in along the edges with a brush, then roll the paint on in sections, usually applying two coats.",
    ),
    (
        "what is the theory of evolution",
        "The theory of evolution by natural selection holds that living things inherit variations, and those better suited to their environment leave more offspring, so species change over time.",
    ),
    (
        "how do submarines dive",
        "A submarine dives by flooding ballast tanks with seawater to become heavier than the water it displaces, and surfaces by blowing the water out with compressed air.",
    ),
    (
        "what is the best way to study for exams",
        "Spread study over several weeks, test yourself rather than rereading, mix different topics in one session, and sleep well before the exam.",
    ),
    (
        "how does the heart pump blood",
        "The heart has four chambers; the right side pumps blood to the lungs to collect oxygen, and the left side pumps the oxygen-rich blood around the body.",
    ),
    (
        "what is cloud computing",
        "Cloud computing means renting computing power, storage and software over the internet from a provider's data centres instead of running your own servers.",
    ),
    (
        "how to make a paper airplane",
        "Fold a sheet of paper in half lengthwise, fold the top corners to the centre line, fold the new edges to the centre again, then fold down the wings on each side.",
    ),
    (
        "why do we have leap years",
        "A year on earth is about 365 and a quarter days, so an extra day is added to February every four years to keep the calendar in step with the seasons.",
    ),
    (
        "what is the Mediterranean diet",
        "The Mediterranean diet is rich in vegetables, fruit, whole grains, legumes, olive oil and fish, with little red meat, and is linked to lower rates of heart disease.",
    ),
    (
        "how do glaciers form",
        "Glaciers form where more snow falls each winter than melts in summer; the snow compacts into dense ice that slowly flows downhill under its own weight.",
    ),
    (
        "what is a mortgage",
        "A mortgage is a loan to buy property, repaid with interest over many years, in which the property itself is security that the lender can take if payments stop.",
    ),
    (
        "how to change a flat tire",
        "Loosen the wheel nuts, jack up the car on firm ground, remove the nuts and the wheel, fit the spare, tighten the nuts in a star pattern and lower the car.",
    ),
    (
        "what is the water cycle",
        "Water evaporates from oceans and lakes, condenses into clouds, falls as rain or snow, and flows back through rivers and groundwater to the sea.",
    ),
    (
        "how does memory work",
        "Memories form when connections between neurons are strengthened; the hippocampus helps store new ones, and sleep and repetition help move them into long-term memory.",
    ),
    (
        "who was Marie Curie",
        "Marie Curie was a physicist and chemist who discovered polonium and radium and was the first person to win Nobel Prizes in two sciences, physics and chemistry.",
    ),
    (
        "how to reduce food waste at home",
        "Plan meals, write a shopping list, store food properly, use leftovers, and understand that best before dates are about quality rather than safety.",
    ),
    (
        "what is an earthquake magnitude scale",
        "Earthquake magnitude is measured on a logarithmic scale: each whole number up means about 32 times more energy released, so a magnitude 7 dwarfs a magnitude 5.",
    ),
    (
        "how do antibiotics work",
        "Antibiotics kill bacteria or stop them multiplying, for example by breaking their cell walls; they do not work against viruses such as those that cause colds.",
    ),
    (
        "what is the internet",
        "The internet is a global network of networks that exchange data using shared protocols, carrying the web, email, video and countless other services.",
    ),
    (
        "how to take care of houseplants",
        "Most houseplants need bright indirect light, water when the top of the soil is dry, good drainage, and occasional feeding during spring and summer.",
    ),
    (
        "why do stars twinkle",
        "Stars twinkle because their light passes through layers of moving air of different temperatures, which bend it slightly this way and that before it reaches the eye.",
    ),
    (
        "what is a balanced diet",
        "A balanced diet includes plenty of vegetables and fruit, whole grains, protein from beans, fish, eggs or meat, some dairy or alternatives, and little sugar and salt.",
    ),
    (
        "how does a camera take a picture",
        "A camera's lens focuses light onto a sensor, whose millions of light-sensitive cells record the brightness and colour of each point as pixels.",
    ),
    (
        "what is the Renaissance",
        "The Renaissance was a cultural movement in Europe from the fourteenth to the seventeenth century that revived classical learning and produced artists such as Leonardo and Michelangelo.",
    ),
    (
        "how to prepare for a job interview",
        "Research the company, reread the job description, prepare short stories that show your skills, practise common questions aloud, and have questions of your own ready.",
    ),
    (
        "what causes the northern lights",
        "The northern lights appear when charged particles from the sun are guided by the earth's magnetic field into the upper atmosphere near the poles, where they make the gases glow.",
    ),
    (
        "how do bicycles stay upright",
        "A moving bicycle stays upright mostly because the rider steers into any lean, and the geometry of the front fork helps the wheel turn in the right direction by itself.",
    ),
)


def build_pairs() -> list[dict[str, str]]:
    """Each topic's query with its own passage, another topic's passage, and three passages run together."""
    count = len(TOPICS)
    pairs = []
    for index, (query, passage) in enumerate(TOPICS):
        other = TOPICS[(index + 37) % count][1]
        long_text = " ".join(TOPICS[(index + offset) % count][1] for offset in (11, 53, 71))
        pairs.extend({"query": query, "text": text} for text in (passage, other, long_text))
    return pairs


def render() -> str:
    return "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in build_pairs())


if __name__ == "__main__":
    PAIRS_FILE.write_text(render())
    print(f"wrote {len(build_pairs())} pairs to {PAIRS_FILE}")
