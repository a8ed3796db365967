"""Building blocks shared by layer 0 and the latent stack."""
