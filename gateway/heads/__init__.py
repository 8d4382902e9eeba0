"""Research heads: fit, evaluate and deploy a site's own heads on exported embeddings."""
