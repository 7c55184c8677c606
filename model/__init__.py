"""The stamp autoencoder, its linear probe and the self-describing bundle. Imports nothing from
trainer/ or consumer/."""
