"""IRG: interleaving reasoning generation — model, inference, data, training, serving."""
