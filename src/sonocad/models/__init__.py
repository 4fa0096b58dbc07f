"""Networks: timm backbones, packaged weights and the classifier head (`classifier`), the lesion-mask decoder
(`maskhead`), precision, input pipeline and batched inference (`infer`)."""
