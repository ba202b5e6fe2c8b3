"""Parts shared by several methods: backbone trunk, layers, accumulators, kNN, sampling, family bases."""
