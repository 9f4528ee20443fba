"""Tokenizing for ask.c, which stays outside the C core (runtime.text, no torch):

    python runtime/csrc/examples/ids.py ARTIFACTS "What happens in the video?" > ids.txt
    python runtime/csrc/examples/ids.py ARTIFACTS --decode 319 767 338 ...      # ask's output -> text

ids.txt holds two lines: the prompt's LLM ids (the manifest's conversation template for a first question about
media, the image id where the frames go) and the question's Q-Former ids; runtime.Pipeline's ids for the same
question (tests/test_c_backends.py checks that).
"""
import sys
from pathlib import Path

from runtime import text
from runtime.manifest import read_manifest


def main(root: Path, args: list[str]):
    m = read_manifest(root, verify_hashes=False)
    p, special, files = m["prompt"], m["special_ids"], m["tokenizers"]
    llm = text.LLMTokenizer(root / files["llm"], special["bos"], special["eos"])
    if args[0] == "--decode":
        print(llm.decode(int(i) for i in args[1:]))
        return
    question = args[0]
    prompt = f"{p['system']}{p['sep']}{p['roles'][0]}: {p['media_prefix']}{question}{p['sep']}{p['roles'][1]}:"
    qformer_ids, _ = text.QFormerTokenizer(root / files["qformer"], files["qformer_max_length"])([question])
    print(*llm.encode_prompt(prompt, p["image_placeholder"], special["image"]))
    print(*qformer_ids[0])


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
