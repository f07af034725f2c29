"""Fixed evaluation texts shared by the real-model tests and tools/fidelity.py: an English
passage of >= 200 tokens for perplexity, and sentences for embedding similarity."""

PASSAGE = (
    "The Rhine is one of the major rivers of Europe. It rises in the Swiss Alps, flows through "
    "Lake Constance and then westward along the border between Switzerland and Germany, before "
    "turning north near the city of Basel. For much of its middle course it forms the boundary "
    "between France and Germany, and it then crosses the western part of Germany, where it passes "
    "cities such as Mainz, Koblenz, Bonn, Cologne and Düsseldorf. In the Netherlands the river "
    "divides into several branches that reach the North Sea near Rotterdam, one of the largest "
    "ports in the world. The Rhine has been an important route for trade since Roman times, when "
    "it marked the northern frontier of the empire, and many castles were built along its banks "
    "during the Middle Ages to collect tolls from passing ships. Today it is still one of the "
    "busiest waterways on the continent, carrying coal, grain, chemicals and containers between "
    "the industrial regions of Switzerland, France, Germany and the Netherlands. The valley "
    "between Bingen and Koblenz, with its steep vineyards, small towns and ruined castles, is a "
    "World Heritage Site and attracts millions of visitors every year. Pollution was a serious "
    "problem in the twentieth century, but cooperation between the countries along the river has "
    "greatly improved the quality of its water, and salmon have begun to return to some of its "
    "tributaries."
)

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and the actors are great.",
    "Paris is the capital and most populous city of France.",
    "Quantum computers use qubits instead of classical bits.",
    "I would like to order a large pizza with mushrooms.",
    "The stock market fell sharply after the announcement.",
    "Cats often sleep for more than twelve hours a day.",
    "How do I reset my password?",
]
