"""Sizes of the offline base model (GPT-2 shapes), torch-free so the CLI's options can list them."""

# name -> (layers, width, heads, context, vocabulary)
SIZES = {
    "tiny": (4, 256, 4, 512, 8000),
    "small": (6, 384, 6, 512, 8000),
}
