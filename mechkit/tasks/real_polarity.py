"""Hand-written English sentences of known polarity, for probing pretrained models (MiniLM, SmolLM2).

Each row of :data:`PAIRS` is ``(topic, positive sentence, negative sentence)`` about the same
subject, so that group folds can keep both halves of a pair on one side: a probe that only learnt
the subject ("the pasta ...") then scores at chance. Some sentences carry the polarity through a
negation ("not bad at all", "never disappoints", "never worked"), and some are mild ("pretty
decent", "a little bitter"), so a bag of sentiment words alone does not solve the set.
"""

from __future__ import annotations

import re

PAIRS: tuple[tuple[str, str, str], ...] = (
    # food
    ("food", "The pasta was cooked perfectly and tasted wonderful.",
     "The pasta was overcooked and tasted of nothing."),
    ("food", "This soup is not bad at all.", "This soup is not worth eating."),
    ("food", "The bread at that bakery is always fresh and delicious.",
     "The bread at that bakery is always stale and dry."),
    ("food", "I loved the spicy curry we had last night.", "I hated the greasy curry we had last night."),
    ("food", "The salad was fresh, crisp and generous.", "The salad was limp, soggy and tiny."),
    ("food", "Their chocolate cake never disappoints.", "Their chocolate cake never tastes as good as it looks."),
    ("food", "The coffee here is pretty decent.", "The coffee here is a little bitter."),
    ("food", "The pizza arrived hot and the crust was perfect.", "The pizza arrived cold and the crust was burnt."),
    ("food", "My grandmother's stew is the best thing I have ever eaten.",
     "That stew was the worst thing I have ever eaten."),
    ("food", "The fruit at the market was ripe and sweet.", "The fruit at the market was bruised and sour."),
    ("food", "The sushi was fresh and beautifully presented.", "The sushi smelled odd and fell apart."),
    ("food", "I could eat these noodles every day.", "I would not eat these noodles again."),
    # service
    ("service", "The waiter was friendly and very attentive.", "The waiter was rude and ignored us all evening."),
    ("service", "Our food came quickly and the staff were lovely.",
     "We waited an hour and the staff did not care."),
    ("service", "The customer service team solved my problem in minutes.",
     "The customer service team never solved my problem."),
    ("service", "The nurse was patient and kind with my son.", "The nurse was impatient and cold with my son."),
    ("service", "The plumber was on time and did a tidy job.", "The plumber was late and left a mess behind."),
    ("service", "The support agent was helpful and polite.", "The support agent was unhelpful and rude."),
    ("service", "The shop assistant went out of her way to help me.",
     "The shop assistant could not be bothered to help me."),
    ("service", "I have no complaints about the service.", "I have nothing good to say about the service."),
    ("service", "The bank sorted out the error without any fuss.", "The bank made the error worse and blamed me."),
    ("service", "The delivery driver was careful with the parcel.",
     "The delivery driver threw the parcel over the fence."),
    # films and television
    ("films", "The film was gripping from start to finish.", "The film was dull from start to finish."),
    ("films", "The acting in this movie is superb.", "The acting in this movie is wooden."),
    ("films", "This comedy made me laugh out loud.", "This comedy did not make me laugh once."),
    ("films", "The ending was moving and beautifully done.", "The ending was rushed and made no sense."),
    ("films", "The new series is not boring at all.", "The new series is boring and far too long."),
    ("films", "The documentary was fascinating and well made.", "The documentary was shallow and badly edited."),
    ("films", "I would happily watch this film again.", "I want those two hours of my life back."),
    ("films", "The special effects were stunning.", "The special effects looked cheap and fake."),
    ("films", "The plot was clever and full of surprises.", "The plot was predictable and full of holes."),
    ("films", "The sequel is a pleasant surprise.", "The sequel is a big disappointment."),
    # books
    ("books", "I could not put this novel down.", "I could not finish this novel."),
    ("books", "The author writes with warmth and humour.", "The author writes with no warmth or humour."),
    ("books", "This cookbook has clear and useful recipes.", "This cookbook has confusing and useless recipes."),
    ("books", "The characters felt real and memorable.", "The characters felt flat and forgettable."),
    ("books", "The story is charming and well paced.", "The story is tedious and badly paced."),
    ("books", "The guide book was accurate and handy.", "The guide book was out of date and misleading."),
    ("books", "The poems are fairly pleasant.", "The poems are somewhat dreary."),
    ("books", "This textbook explains things nicely.", "This textbook explains nothing clearly."),
    # music
    ("music", "The concert was amazing and the crowd was great.",
     "The concert was terrible and the sound was awful."),
    ("music", "Her new album is quite enjoyable.", "Her new album is rather forgettable."),
    ("music", "The band sounded tight and full of energy.", "The band sounded sloppy and tired."),
    ("music", "That song always cheers me up.", "That song always gets on my nerves."),
    ("music", "The orchestra played wonderfully tonight.", "The orchestra played out of tune tonight."),
    ("music", "The singer has a lovely, warm voice.", "The singer has a harsh, thin voice."),
    ("music", "The festival was well organised and fun.", "The festival was badly organised and miserable."),
    ("music", "The choir never sounded better.", "The choir never sounded worse."),
    # weather
    ("weather", "What a lovely sunny morning.", "What a miserable rainy morning."),
    ("weather", "The weather was perfect for our picnic.", "The weather ruined our picnic."),
    ("weather", "It was warm and bright all week.", "It was cold and grey all week."),
    ("weather", "The storm was not as bad as we feared.", "The storm was even worse than we feared."),
    ("weather", "A gentle breeze made the afternoon pleasant.", "A bitter wind made the afternoon unbearable."),
    ("weather", "The snow made the village look magical.", "The snow blocked the roads and cut off the village."),
    ("weather", "The rain finally stopped and the sky cleared.", "The rain never stopped and the sky stayed dark."),
    ("weather", "The spring weather has been rather nice.", "The spring weather has been rather gloomy."),
    # travel
    ("travel", "The flight was smooth and landed early.", "The flight was bumpy and landed three hours late."),
    ("travel", "Our trip to the coast was relaxing.", "Our trip to the coast was exhausting."),
    ("travel", "The train was clean, quiet and on time.", "The train was dirty, crowded and late."),
    ("travel", "The tour guide was knowledgeable and funny.", "The tour guide was bored and hard to follow."),
    ("travel", "The view from the top was breathtaking.", "The view from the top was hidden by ugly buildings."),
    ("travel", "Nothing went wrong on the whole journey.", "Everything went wrong on the whole journey."),
    ("travel", "The beach was quiet and spotless.", "The beach was crowded and covered in litter."),
    ("travel", "The city was easy to explore on foot.", "The city was impossible to get around."),
    ("travel", "I never felt unsafe walking around the old town.",
     "I never felt safe walking around the old town."),
    ("travel", "The airport was calm and easy to navigate.", "The airport was chaotic and confusing."),
    # hotels
    ("hotels", "The hotel room was spacious and spotless.", "The hotel room was cramped and dirty."),
    ("hotels", "The bed was comfortable and I slept well.", "The bed was lumpy and I barely slept."),
    ("hotels", "Breakfast at the hotel was excellent.", "Breakfast at the hotel was dreadful."),
    ("hotels", "The staff at reception were welcoming.", "The staff at reception were unfriendly."),
    ("hotels", "The pool was warm and clean.", "The pool was freezing and dirty."),
    ("hotels", "The cottage was cosy and quiet.", "The cottage was damp and noisy."),
    # products
    ("products", "This phone has a fantastic battery life.", "This phone has a pathetic battery life."),
    ("products", "The headphones sound rich and clear.", "The headphones sound muddy and tinny."),
    ("products", "The vacuum cleaner works brilliantly.", "The vacuum cleaner stopped working after a week."),
    ("products", "These shoes are comfortable from day one.", "These shoes gave me blisters from day one."),
    ("products", "The jacket keeps me warm and dry.", "The jacket lets the rain straight through."),
    ("products", "The blender is sturdy and easy to clean.", "The blender is flimsy and hard to clean."),
    ("products", "For the price, this kettle is not bad.", "For the price, this kettle is a waste of money."),
    ("products", "The laptop is fast and light.", "The laptop is slow and heavy."),
    ("products", "The chair is well made and looks great.", "The chair is poorly made and wobbles."),
    ("products", "This backpack has held up perfectly for years.", "This backpack fell apart within a month."),
    ("products", "The lamp gives a soft and pleasant light.", "The lamp flickers and gives a harsh light."),
    ("products", "The watch is elegant and reliable.", "The watch is ugly and unreliable."),
    # software
    ("software", "The app is simple and works well.", "The app is confusing and keeps crashing."),
    ("software", "The update made my computer faster.", "The update made my computer slower."),
    ("software", "The website is easy to use.", "The website is a nightmare to use."),
    ("software", "The game is fun and beautifully designed.", "The game is tedious and full of bugs."),
    ("software", "The printer never gives me any trouble.", "The printer never works when I need it."),
    ("software", "Setting up the router was quick and painless.", "Setting up the router was slow and painful."),
    # work and school
    ("work", "The meeting was short and productive.", "The meeting was long and pointless."),
    ("work", "My new job is going really well.", "My new job is going really badly."),
    ("work", "The teacher was encouraging and patient.", "The teacher was dismissive and impatient."),
    ("work", "The course was interesting and well taught.", "The course was boring and poorly taught."),
    # sport and everyday life
    ("sport", "Our team played brilliantly today.", "Our team played terribly today."),
    ("sport", "The match was exciting until the very end.", "The match was dull from the first minute."),
    ("sport", "The gym is clean and the trainers are friendly.", "The gym is filthy and the trainers are rude."),
    ("places", "The park is peaceful and well kept.", "The park is noisy and neglected."),
    ("places", "The new neighbours are friendly and quiet.", "The new neighbours are hostile and loud."),
    ("health", "The doctor listened carefully and reassured me.", "The doctor did not listen and rushed me out."),
)

_NEGATION = re.compile(r"\b(not|never|no|nothing|cannot)\b|n't\b", re.IGNORECASE)


def has_negation(sentence: str) -> bool:
    """Whether ``sentence`` contains a negation word ("not", "never", "no", "nothing", "-n't")."""
    return _NEGATION.search(sentence) is not None
