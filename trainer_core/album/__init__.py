"""Albums: scanning image folders and pairs, captions and triggers, the encoded-latent cache, dataset lint."""
