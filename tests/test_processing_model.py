"""Processor and model together: batches of prompts with 0, 1 or 2 images, in every image mode, equal each prompt alone."""

import pytest
import torch
from PIL import Image

from model_helpers import IMAGE_SIZE, TOKENS_PER_CROP, tiny_model_for_processor
from processing_helpers import make_tiny_processor


def image(width, height, seed):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def conversation(question, num_images, answer=None, follow_up=None):
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
    return messages


REQUESTS = [
    (conversation("What is the color of the large square?", 1), [image(50, 30, 1)]),
    (conversation("Describe it.", 0), []),
    (conversation("How many cats are there in the two pictures?", 2), [image(20, 64, 2), image(90, 90, 3)]),
    (conversation("What is written?", 1, answer="It says stop.", follow_up="And the colour?"), [image(33, 17, 4)]),
]


@pytest.fixture(scope="module")
def processor():
    return make_tiny_processor(image_size=IMAGE_SIZE, num_image_tokens_per_crop=TOKENS_PER_CROP)


@pytest.fixture(scope="module")
def model(processor):
    return tiny_model_for_processor(processor)


@pytest.mark.parametrize("mode", [{"image_aspect_ratio": "square"}, {"image_aspect_ratio": "pad"}, {"image_hd": True}])
def test_batch_equals_each_prompt_alone(processor, model, mode):
    prompts = [processor.apply_chat_template(messages, add_generation_prompt=True) for messages, _ in REQUESTS]
    images = [request_images for _, request_images in REQUESTS]
    batch = processor(text=prompts, images=images, return_tensors="pt", **mode)
    crops = 5 if mode.get("image_hd") else 1
    assert batch["image_num_crops"].tolist() == [crops] * 4
    assert batch["instruction_mask"].amax(dim=1).tolist() == [1, 0, 1, 2]  # the text-only chat has no query block
    with torch.no_grad():
        batch_logits = model(**batch).logits
        batch_tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)[:, batch["input_ids"].shape[1] :]
        for index, (prompt, request_images) in enumerate(zip(prompts, images)):
            alone = processor(text=[prompt], images=[request_images], return_tensors="pt", **mode)
            length = alone["input_ids"].shape[1]
            alone_logits = model(**alone).logits[0]
            torch.testing.assert_close(batch_logits[index, -length:], alone_logits, atol=1e-4, rtol=0)
            alone_tokens = model.generate(**alone, max_new_tokens=5, do_sample=False)[0, length:]
            assert batch_tokens[index].tolist() == alone_tokens.tolist()


def test_processor_output_drives_embq_on_the_instruction(processor, model):
    messages, request_images = REQUESTS[0]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[request_images], return_tensors="pt")
    captured = []
    handle = model.model.embedded_query.register_forward_hook(
        lambda module, args, kwargs, output: captured.append(kwargs["text_mask"].sum().item()), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    question_tokens = processor.tokenizer("What is the color of the large square?")["input_ids"]
    assert captured == [len(question_tokens)]
