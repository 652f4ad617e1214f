#!/usr/bin/env python
"""Download the data sets into the layout that evaluate.py, icl.py and train_cse.py read (see data/README.md).

    python data/download.py                      # everything, into data/ next to this script
    python data/download.py --sets sts,transfer  # only what `evaluate.py --tasks all` needs
    python data/download.py --list               # what comes from where; nothing is fetched
    python data/download.py --dest /somewhere    # then: export SENTEMB_DATA=/somewhere

Where the files come from: SentEval's own data script (facebookresearch/SentEval,
data/downstream/get_transfer_data.bash) fetches STS12-16, STS-B, SICK, MR/CR/SUBJ/MPQA, SST,
TREC and MRPC from their original hosts, several of which are gone now, and then tokenizes
them. We fetch the result of that script as committed in public SimCSE checkouts, at pinned
commits, plus the original STS releases (sts_raw/), PromptEOL's 300 demonstrations
(kongds/scaling_sentemb) and SimCSE's NLI training triplets (princeton-nlp on Hugging Face).
Every file except that last one is checked against its sha256 below, so a download is
byte-identical to the data the project's numbers were measured on. Files already present
with the right checksum are skipped, and each file is written atomically: rerunning after an
interruption resumes. The files in NOT_DOWNLOADED are derived ones; --list says where each comes from.
"""
import argparse
import hashlib
import io
import pathlib
import sys
import urllib.request
import zipfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from support.cli import UserError, cli  # noqa: E402
from support.files import atomic  # noqa: E402
COMMITS = {
    "leotmc/simcse": "e0b62fcef5dadeeef55aef3b640ab219860c201b",          # SentEval data: STS, SICK
    "robertoviegas/SimCSE": "a0d98a537ceffe5f728077dd0930c41171db2d16",   # SentEval data: transfer, SNLI
    "amao0o0/SynWMD": "59042a92e862db58bd01e47914345d2f52d2a4a3",          # original STS releases
    "brmson/dataset-sts": "e1d3375f5b3bc24f21aa4e46f96eb379e9fc1081",      # original SICK release
    "kongds/scaling_sentemb": "8567aa083c1b3c77586670f91e7f78eb80694ad3",  # PromptEOL demonstrations
}
SE = "SentEval/data/downstream"
RAW = "data/downstream/STS"
FOLDERS = {  # local folder -> (repository, folder there); file names are the same on both sides
    **{f"sts/sts{y}": ("leotmc/simcse", f"{SE}/STS/STS{y}-en-test") for y in range(12, 17)},
    "sts/stsb": ("leotmc/simcse", f"{SE}/STS/STSBenchmark"),
    "sts/sick": ("leotmc/simcse", f"{SE}/SICK"),
    "sts_raw/sts12": ("amao0o0/SynWMD", f"{RAW}/STS12-en-test/test-gold"),
    "sts_raw/sts13": ("amao0o0/SynWMD", f"{RAW}/STS13-en-test/test-gs"),
    "sts_raw/sts14": ("amao0o0/SynWMD", f"{RAW}/STS14-en-test/sts-en-test-gs-2014"),
    "sts_raw/sts15": ("amao0o0/SynWMD", f"{RAW}/STS15-en-test/test_evaluation_task2a"),
    "sts_raw/sts16": ("amao0o0/SynWMD", f"{RAW}/STS16-en-test/sts2016-english-with-gs-v1.0"),
    "sts_raw/stsb": ("amao0o0/SynWMD", f"{RAW}/STSBenchmark/stsbenchmark"),
    "sts_raw/sick": ("brmson/dataset-sts", "data/sts/sick2014"),
    **{f"transfer/{t.lower()}": ("robertoviegas/SimCSE", f"{SE}/{t}") for t in ("MR", "CR", "SUBJ", "MPQA", "TREC", "MRPC")},
    "transfer/sst2": ("robertoviegas/SimCSE", f"{SE}/SST/binary"),
    "nli/snli_senteval": ("robertoviegas/SimCSE", f"{SE}/SNLI"),
    "icl": ("kongds/scaling_sentemb", ""),
}
FILE_SOURCES = {"sts/sick/readme.txt": ("brmson/dataset-sts", "data/sts/sick2014")}
# The CC BY-SA attribution of STS15 answers-forums ships inside a zip next to the data.
ZIPPED = {"sts/sts15/answers-forums-attribution":
          ("leotmc/simcse", f"{SE}/STS/STS15-en-test/STS.answers-forums.zip", "STS.answers-forums")}
NLI_FOR_SIMCSE = "https://huggingface.co/datasets/princeton-nlp/datasets-for-simcse/resolve/main/nli_for_simcse.csv"
SETS = ["sts", "sts_raw", "transfer", "icl", "nli"]
NOT_DOWNLOADED = {  # read by some script, but built here rather than published anywhere
    "dict/wordnet30_word_definitions.tsv.gz": "icl.py candidates --source wordnet; derived from Princeton WordNet 3.0 "
    "(Debian package wordnet-base 1:3.0-37, usr/share/wordnet/{index,data}.*), see the shared data's MANIFEST.md",
    "nli/nli_triplets_partial.csv": "train_cse.py's fallback when nli/nli_for_simcse.csv is absent; derived from "
    "SNLI dev/test (nli/snli_senteval) and XNLI-en, see the shared data's README.md",
}

# sha256 and local path of every file, as listed in the shared data's MANIFEST.md
SHA256 = """
92c3a40dbd756c14abaf97266543843bb8bd1365ef21d020ccc48a40667d8777 icl/icl_examples.txt
d164d72435c3289fe53cb01e983f7c06e104bf192c0cae9caf2e99bf2e15f974 nli/snli_senteval/labels.dev
e25c363e5cc70d5494d6e6555d8053eced22dca836e0f03067530eaad3d4f5f5 nli/snli_senteval/labels.test
28a398b5478b10b4b851d4bb5b2e5767171519add6586015ed50b9436df11d00 nli/snli_senteval/s1.dev
62cb8107dc3c56a4376e5e521842be24e0d61c92c346b94917da2bbf2a47d8be nli/snli_senteval/s1.test
a8c59709630b64ba103f7784c0cb7104a6baf23234562487264d9634714f5d2b nli/snli_senteval/s2.dev
1174f3ad30a3c30fc0f9eeffc1b3b6a79e0514026c5a658968a8e2a324b311a1 nli/snli_senteval/s2.test
d0362afe8304c8d08166b82d76da2a8c665d5b635ac1f3f1ee82054511749f97 sts/sick/SICK_test_annotated.txt
e02bd30f17ab87358f80ef079a6ef797acd244c3c7515de454301c7c257e410c sts/sick/SICK_train.txt
0d0786bd8671a0a70614f2f890b8ab24b3c24d1ccb624bcca87618091fbe4f11 sts/sick/SICK_trial.txt
4ff14a2b07603f2214c2803a6e012048c795be5ba4e5d1d33b87d7210f633bf7 sts/sick/readme.txt
d47be1641ac98ac312de6f0746b65683df392f70d843eaac9fb10ebd4cb4cb63 sts/sts12/00-readme.txt
5526be59228bc34ccb3cb6f1f56c0d7278d3419b8886713ae016fd92b151f19c sts/sts12/STS.gs.MSRpar.txt
9c6096c6bcfb0144c8bbddb00900ca9198c88498630cd0c8f08d18365f1d7150 sts/sts12/STS.gs.MSRvid.txt
708530c4d006d06881f3289fce35d624d7efe562dcf0fe5f8aa0eec3a135f6d4 sts/sts12/STS.gs.SMTeuroparl.txt
088d8ca22c0aa406e4a5d2e6e308a4f38b482b8e736c2445a38ffb6e4c4fb4fd sts/sts12/STS.gs.surprise.OnWN.txt
aa6dfc868db333c43dc59be14d46fa6587c7ebddc0d497e717f647bf35121cf1 sts/sts12/STS.gs.surprise.SMTnews.txt
21c0c6cc32f68f69d672dfae0f86935cdc2627bae4941381692941aa9320f8c4 sts/sts12/STS.input.MSRpar.txt
c4a92a3645744f77d1cda9f2af7da5d11e807ae296f6a20fe5930403fb9c4dfe sts/sts12/STS.input.MSRvid.txt
05acf33c0fcb592347f49e279137a17e0244d7b0d37cc113134320a5d3f586e1 sts/sts12/STS.input.SMTeuroparl.txt
e605c67de4b7cee2c5629239d209e2845920f475ebd0468bdcf03d8da2ffa9cf sts/sts12/STS.input.surprise.OnWN.txt
cc4a0b9a1355c5680a8a37c02f2d08e35f95754b9f89a2a4a05088ee5ff57ffe sts/sts12/STS.input.surprise.SMTnews.txt
531ee28a3787b11dd14dda8d809e724479d87f9705120494aad584c9cb14a6ce sts/sts13/00-readme.txt
8ca95b7228119578e2007839cf7969f22c4f1fd41fd610c4b7f9683072d98066 sts/sts13/STS.gs.FNWN.txt
0cd497aaddb00a2fb6db25f77bccfc09e8aa012e11549b81b434bab1a27ad954 sts/sts13/STS.gs.OnWN.txt
f49f64089011436dd296ef384c07160219406feef7dc4b9fa2af52a519f32bc6 sts/sts13/STS.gs.headlines.txt
a20cb41a33a528f3c089c94ef24da8eb5e26ed594937cf6fa90f3d1c79d6c53c sts/sts13/STS.input.FNWN.txt
cb74993eef23cfa2c03da7e5a08c62e50c9baafae0fa9ba0bb5a09d8e7d2be65 sts/sts13/STS.input.OnWN.txt
637f3b4afdc8d1cc789e91a4d7217efff30e503c34a872d93e8b27e7b1136cb7 sts/sts13/STS.input.headlines.txt
9fe9d64362ac42ed24010d5b00f227235a660dc2466fba743f31051fd121ef73 sts/sts14/00-readme.txt
1c80147df270ea4cfce14a47ed29f8a2f10d5dc016d02836077fd786ff7f535b sts/sts14/STS.gs.OnWN.txt
ba6dc76696b5c93985590a325b4d142449932cdf0d715b2bab1b1743fe3c488c sts/sts14/STS.gs.deft-forum.txt
105c5b333abd50c274efb4dae9e3e0dab36ed63eee780cfb49955b1586bd62f2 sts/sts14/STS.gs.deft-news.txt
f243c34647255cd0b994565ed4f58dd31506e7d9c9d6250d1a6dd14095625832 sts/sts14/STS.gs.headlines.txt
fc994ebacc7074c332626fa9e29542d7340a48a3cdb999b47cdb59c378523a62 sts/sts14/STS.gs.images.txt
0098c644bfeaa2d511a8297b1940771865900c372c9dd49a62726dc5ec02c9a3 sts/sts14/STS.gs.tweet-news.txt
8cd2333328d17e3212afa2d43dd934c5521e3fd35fc786b992dc7864f9d34f8f sts/sts14/STS.input.OnWN.txt
b39579e59c7b9f4063545c3d4643f8db16dc060cd0a35447ef56ff0aabec9d83 sts/sts14/STS.input.deft-forum.txt
cc450dcd9228211c1a311de1ff28199f166dce6f7fc81dcb5ce968a3a8a80d2d sts/sts14/STS.input.deft-news.txt
2ed0ea55d196cdbb440ed428eb1846dcb43486a692aafb22b3bc5c14c44407c8 sts/sts14/STS.input.headlines.txt
295fc99f8a9215c330b36a08bc1ff3e428f10057be5bb915262111494b3616e2 sts/sts14/STS.input.images.txt
b25b3768762aa7cdcd89f2a25ce5049de7e4cd51b138227c3a31092ae8e2b5f5 sts/sts14/STS.input.tweet-news.txt
38fe35ef21a0f224b6cc51e00d138810063521cd90458a7d77e4e0aa3a79542d sts/sts15/00-readme.txt
1644301a7540e5484da285002e9269062852efb2272be614cad99c9530f6a102 sts/sts15/STS.gs.answers-forums.txt
028db213140f8c7aef7497c4ae38b6380938f20359852231669c83dce11c3701 sts/sts15/STS.gs.answers-students.txt
5736192faaccbdbecd0ef6b73ec04b24115cd2e48d55dc3b1b170da3d2a81c75 sts/sts15/STS.gs.belief.txt
e8e432f769c8a94ddb62ae3343890ac24a9dd78a116d56c707313bc59413dd56 sts/sts15/STS.gs.headlines.txt
ed8878209098c77ca7f02ac413d3fd698f92ad3425999555e50fda89fc46012a sts/sts15/STS.gs.images.txt
65718ec23624d97933308adc08cb270db798cdd5593d35501be9bfda5ba1a28a sts/sts15/STS.input.answers-forums.LICENSE
b8f1bc125559adbb3ac5b33206472b217c12621c3a6b5a8575da47dc0b536fc4 sts/sts15/STS.input.answers-forums.txt
4893f736e84cea176c39c882250f6513d5bbcfa6ebe8d3ffabcef6056d0471a7 sts/sts15/STS.input.answers-students.txt
a54ec7af1924c900d8474586abae465819d2c03c73561aa2e76e7fa5e836faff sts/sts15/STS.input.belief.txt
85d90b0f8f258a47758808d382188ba2ee7b1adbbf84feb776afad0e4691d5d1 sts/sts15/STS.input.headlines.txt
0dac9494186838a8f4dfbb4ee290fec8d7581cf84a33d615c522700b3b50e0d6 sts/sts15/STS.input.images.txt
89be68d246ed5b2768f317c5fa3e616e952f2bec57dfd073b485b19083f8ac4c sts/sts15/answers-forums-attribution/LICENSE.txt
9f8785069364eb60be9e84aac7c00ffc9dee8ba9416a79f5108bd99ae7f683eb sts/sts15/answers-forums-attribution/README.txt
801dd64062a03f0302d2657ca1f064eacfbe2a55042e594caed572f0738d9182 sts/sts15/answers-forums-attribution/academia.stackexchange.com.tsv
3d7f800b7d19d5388fb0f35bbed66a10869767cb48d24c8152fafce6760e4f66 sts/sts15/answers-forums-attribution/astronomy.stackexchange.com.tsv
855f01f3b9f78e44abe4f75722f7cfec254559b5d539f4ee1f69ddc35df0d8c7 sts/sts15/answers-forums-attribution/cogsci.stackexchange.com.tsv
76e06988295e54afb3f292fff3e1854e9fa812dbbea5b2018c53e7280252c84e sts/sts15/answers-forums-attribution/cooking.stackexchange.com.tsv
3e895f935794e1545c5e591934f46572fe800119a999126f2994bd967bfcf4af sts/sts15/answers-forums-attribution/english.stackexchange.com.tsv
6744ed47bc06b44f948b9f7f48c66bfb9e9d670c15347b45e90099273d2885bf sts/sts15/answers-forums-attribution/fitness.stackexchange.com.tsv
a98e1add70555a57001003a67a91ec8d421cd95d99f8d778f29e747281915c2e sts/sts15/answers-forums-attribution/gardening.stackexchange.com.tsv
d61738d3229abcbb93bf91c7814fe0ebafc749fe8593aa9d8ef70dc07e19db7c sts/sts15/answers-forums-attribution/history.stackexchange.com.tsv
a4f14174ba477ee4481240f2360d70334c6ac00e407392de679641b5358d65f0 sts/sts15/answers-forums-attribution/linguistics.stackexchange.com.tsv
eecff812bd4de9d4579f58d1ec55786853c6bf8593c11d69860d552a11a9e15b sts/sts15/answers-forums-attribution/outdoors.stackexchange.com.tsv
2d1369b45c627fa1ba80b16492e54eab8d91d97da20a855c8d595ccb83973690 sts/sts15/answers-forums-attribution/parenting.stackexchange.com.tsv
9a7c54e808fcf3c724c25e47451c00c2a37de83b07d5218d0747fe448371756f sts/sts15/answers-forums-attribution/pets.stackexchange.com.tsv
42dae85768096f5865db46f629698caf7d167a0b2bab99de72243b811254b7c2 sts/sts15/answers-forums-attribution/philosophy.stackexchange.com.tsv
1cb6e78bd21506351e48a745479f2a05f8d6518f8031ae4b7e451d83bd6d1a5b sts/sts15/answers-forums-attribution/photo.stackexchange.com.tsv
15b8ea721d416fac58df3823ed936247119fd6c88b3c3a925a798d07792e928b sts/sts15/answers-forums-attribution/politics.stackexchange.com.tsv
6f1c7a15d1024dfce2757188b77238b1c74773b501403f3b0e607a699a55e7f7 sts/sts15/answers-forums-attribution/productivity.stackexchange.com.tsv
17c3323a145f1ed5ae0440e46df2b8e7c29383f645c972c2c0fca7850a708384 sts/sts15/answers-forums-attribution/scifi.stackexchange.com.tsv
d5ed8487deb6a43860cdf74eef6883a481b441cc82d2973b07b9c272e7d9e81b sts/sts15/answers-forums-attribution/sports.stackexchange.com.tsv
fe1b94d431930d973f4cb47c4e225169588795f279c6896a4e014b45af3a5b31 sts/sts15/answers-forums-attribution/travel.stackexchange.com.tsv
b8e07929cd9ca87c2e315ae234b5e9a6b6b6bb03cac9a8ae3f1c28d7797c3c9f sts/sts15/answers-forums-attribution/writers.stackexchange.com.tsv
94b7380d16f832ae97bcb48536f22fe9a22e8e20f8cf88a9298f65c556e3a6f2 sts/sts16/LICENSE.txt
1b74b4c84a59f139153f0348e212bfdb33dffd3b008dfb2c4f7728c4fa27141f sts/sts16/README.txt
332efd741b0cb247d20dd2a6cec854360c921c7e6b395f328f562d8d26057214 sts/sts16/STS.gs.answer-answer.txt
01e33a95996201a6e81e3cce9eda0f15048b77613ea64dce2929bb35479f7d85 sts/sts16/STS.gs.headlines.txt
29984944a91aaff484f2b2e5d4d434fc8a6f5ef6f578a880cccd2786f5142fdc sts/sts16/STS.gs.plagiarism.txt
81947ed9dbe7f85b7bd249df68ed5c7b2f16f06390ad568eb5554b1e26bc5577 sts/sts16/STS.gs.postediting.txt
cf9ebf9d140191f73620cda0560947ad9283c910735d0d541b8a401a5e64afb0 sts/sts16/STS.gs.question-question.txt
ebbffced7d4630755e61d4dfe4d82121198965a14b9f5734b5abedb961f0725c sts/sts16/STS.input.answer-answer.txt
705c3e82fb85fa3b6706a481b790e1030304ddc9c72d39e126693ed44b258ba6 sts/sts16/STS.input.headlines.txt
dd4ca54d1dfcd7d1cabe67f0de98cde23f4c1696ecc0003afbecae1274305d63 sts/sts16/STS.input.plagiarism.txt
9b455d8da1d1bae692d038da1d431827d23bfec04c64b109efc3b6b620fd422f sts/sts16/STS.input.postediting.txt
58920c7da7dbc1b860609310782d88b7457d599c90a226819b5880262dd7f58a sts/sts16/STS.input.question-question.txt
3dfc3217395f8c5dd05c5f8995f25fe2f8fd258e6dd770b3de480749caee8c70 sts/stsb/LICENSE.txt
e9488363d211c32ca5e912954f16eb9233cfed1b5b4b0475d0d812d35d7c8ef1 sts/stsb/readme.txt
c558fa95fec006608f13e3d942f153b614beabccbf33e64f36418d406a895e37 sts/stsb/sts-dev.csv
22ef3e10603b6655d7c7978c8eee26e7d5291dd5a71c5531b934fb025c108cbf sts/stsb/sts-test.csv
4fc4924edd059a43e9c7c8927a72cb8061a87ef98afdf2026a0e0b540b458693 sts/stsb/sts-train.csv
2b8aa806658d6fc23c6824c83776c2d4fee7556000817b5ec0f982861413b7d0 sts_raw/sick/SICK_test_annotated.txt
266cf8047149bd1d68138dd30439f3122bff30069740ac6705bb6197d9f1b48e sts_raw/sick/SICK_train.txt
5a88cfb62f8c6bd2a3cce0f2421ba2cb8c2be5ab4a800f6f01e2c64aafb7db56 sts_raw/sick/SICK_trial.txt
5526be59228bc34ccb3cb6f1f56c0d7278d3419b8886713ae016fd92b151f19c sts_raw/sts12/STS.gs.MSRpar.txt
9c6096c6bcfb0144c8bbddb00900ca9198c88498630cd0c8f08d18365f1d7150 sts_raw/sts12/STS.gs.MSRvid.txt
708530c4d006d06881f3289fce35d624d7efe562dcf0fe5f8aa0eec3a135f6d4 sts_raw/sts12/STS.gs.SMTeuroparl.txt
088d8ca22c0aa406e4a5d2e6e308a4f38b482b8e736c2445a38ffb6e4c4fb4fd sts_raw/sts12/STS.gs.surprise.OnWN.txt
aa6dfc868db333c43dc59be14d46fa6587c7ebddc0d497e717f647bf35121cf1 sts_raw/sts12/STS.gs.surprise.SMTnews.txt
76bf7089f9e7c05732163a227b3ce679512554513eb783f2548b07d659bd733d sts_raw/sts12/STS.input.MSRpar.txt
476d14034a241f71b832e4ae557dd6cdbe265b57c915570a2583f93b4456948d sts_raw/sts12/STS.input.MSRvid.txt
dd31dbb6e7eef8a0d00347fe012f7cf372943167e30f60f6fb3b10219a41941f sts_raw/sts12/STS.input.SMTeuroparl.txt
07ec7b91348aece0873b41f7fc4e76e9fddf05bdb82c048c98d92f5db0bec07d sts_raw/sts12/STS.input.surprise.OnWN.txt
2788a98ef33c3b7b704ef4891fe863cfcf061338e8aa41cb737d0f137f3ba03c sts_raw/sts12/STS.input.surprise.SMTnews.txt
8ca95b7228119578e2007839cf7969f22c4f1fd41fd610c4b7f9683072d98066 sts_raw/sts13/STS.gs.FNWN.txt
0cd497aaddb00a2fb6db25f77bccfc09e8aa012e11549b81b434bab1a27ad954 sts_raw/sts13/STS.gs.OnWN.txt
f49f64089011436dd296ef384c07160219406feef7dc4b9fa2af52a519f32bc6 sts_raw/sts13/STS.gs.headlines.txt
b48fc64cd85703ac6431f8ea6722f325fe9620fd4f33b3d5c24dd89c553e74bc sts_raw/sts13/STS.input.FNWN.txt
127c66889627f26dc11864dc9be4ba1e4895ed60125985c755429ad588e4b9c8 sts_raw/sts13/STS.input.OnWN.txt
885e6149fff28a79591ba464c13626d03593b822c88c7c04b6564354d31c7561 sts_raw/sts13/STS.input.headlines.txt
1c80147df270ea4cfce14a47ed29f8a2f10d5dc016d02836077fd786ff7f535b sts_raw/sts14/STS.gs.OnWN.txt
ba6dc76696b5c93985590a325b4d142449932cdf0d715b2bab1b1743fe3c488c sts_raw/sts14/STS.gs.deft-forum.txt
105c5b333abd50c274efb4dae9e3e0dab36ed63eee780cfb49955b1586bd62f2 sts_raw/sts14/STS.gs.deft-news.txt
f243c34647255cd0b994565ed4f58dd31506e7d9c9d6250d1a6dd14095625832 sts_raw/sts14/STS.gs.headlines.txt
fc994ebacc7074c332626fa9e29542d7340a48a3cdb999b47cdb59c378523a62 sts_raw/sts14/STS.gs.images.txt
0098c644bfeaa2d511a8297b1940771865900c372c9dd49a62726dc5ec02c9a3 sts_raw/sts14/STS.gs.tweet-news.txt
a227d5fe1c1f729a52a0b39b5b36d3225e1bca3c278e7ed392cac2ecd3990f1c sts_raw/sts14/STS.input.OnWN.txt
8b48aa15bb850e2827446f6e98cc3c5123ff283924b4571a409aa2fab73e35c6 sts_raw/sts14/STS.input.deft-forum.txt
92df5b8c48873cbfba36b73a77955fb965c9244776df9e9c2c4d2f6155bdeefe sts_raw/sts14/STS.input.deft-news.txt
a19f84294325c62a2a403b59957196fd7737f86654ded0e04e0b54bc4a8bcf9e sts_raw/sts14/STS.input.headlines.txt
cec1b3c08b0e4c88aeaf8dca047f5b28f4a8588eeef58475e0f16491d2bb7193 sts_raw/sts14/STS.input.images.txt
250d29ec9394e35443b2a73016ccc55e11b20939a3b8ee3bea9a858ba2f9adc0 sts_raw/sts14/STS.input.tweet-news.txt
1644301a7540e5484da285002e9269062852efb2272be614cad99c9530f6a102 sts_raw/sts15/STS.gs.answers-forums.txt
028db213140f8c7aef7497c4ae38b6380938f20359852231669c83dce11c3701 sts_raw/sts15/STS.gs.answers-students.txt
5736192faaccbdbecd0ef6b73ec04b24115cd2e48d55dc3b1b170da3d2a81c75 sts_raw/sts15/STS.gs.belief.txt
e8e432f769c8a94ddb62ae3343890ac24a9dd78a116d56c707313bc59413dd56 sts_raw/sts15/STS.gs.headlines.txt
ed8878209098c77ca7f02ac413d3fd698f92ad3425999555e50fda89fc46012a sts_raw/sts15/STS.gs.images.txt
fe8e460a74e8e38704ac4e6ddcedec89fd6e51cd0467d6f4301b444b259688e1 sts_raw/sts15/STS.input.answers-forums.txt
16eedf46fb3b29822b275a0ddcff8e873a6eb4bafba244a17c4049ffc318d62a sts_raw/sts15/STS.input.answers-students.txt
6e924a19fb1abbce01a8666f07766250b46a96c89272de8e5b01d0905bc61b79 sts_raw/sts15/STS.input.belief.txt
779c195c54b72282bd3c8ca1dbb09a4155a39b2acd13d5cf819d8555d717cf6a sts_raw/sts15/STS.input.headlines.txt
6f332542a75bcd18ea1442fc129306f746cd7ade7010ea274e763bfca576cc47 sts_raw/sts15/STS.input.images.txt
332efd741b0cb247d20dd2a6cec854360c921c7e6b395f328f562d8d26057214 sts_raw/sts16/STS2016.gs.answer-answer.txt
01e33a95996201a6e81e3cce9eda0f15048b77613ea64dce2929bb35479f7d85 sts_raw/sts16/STS2016.gs.headlines.txt
29984944a91aaff484f2b2e5d4d434fc8a6f5ef6f578a880cccd2786f5142fdc sts_raw/sts16/STS2016.gs.plagiarism.txt
81947ed9dbe7f85b7bd249df68ed5c7b2f16f06390ad568eb5554b1e26bc5577 sts_raw/sts16/STS2016.gs.postediting.txt
cf9ebf9d140191f73620cda0560947ad9283c910735d0d541b8a401a5e64afb0 sts_raw/sts16/STS2016.gs.question-question.txt
7daf2cd87751a0f8b754fe705bdb280c31591d9febf5b6fce9dcb10d3b8a72a7 sts_raw/sts16/STS2016.input.answer-answer.txt
ec8ee1124e71f4cc18c861f542fa8f32c86fef0703de31b0f7a02e22e935d992 sts_raw/sts16/STS2016.input.headlines.txt
6760cb210f4423262fd8962674e6668409690ce888bb1617659c6886cf004019 sts_raw/sts16/STS2016.input.plagiarism.txt
a8a66185877785307803c99a0899d65aefb062c4bf7689560b95d37bb0c05474 sts_raw/sts16/STS2016.input.postediting.txt
b7f95dead3d8c59fbaacbb135643c6ebd322682db6502fdb24d4ce83c9bf016d sts_raw/sts16/STS2016.input.question-question.txt
5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234 sts_raw/stsb/sts-dev.csv
affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a sts_raw/stsb/sts-test.csv
0f71910b59aa1ad973c5897f0791f3b0965a92b8f82b1a95f3eea9f4162fda82 sts_raw/stsb/sts-train.csv
ec94532766f6f962094841ab3bee2ad6f232f996c3756825a91e78bcc294750f transfer/cr/custrev.neg
91a20a4ffeb5d38a39a4087bb247e16538aff21e7d621ae59738379f39f21732 transfer/cr/custrev.pos
8da6e035fa4cea02f0555091096b29a6b3995ff0adf41fad25008dcee066b79e transfer/mpqa/mpqa.neg
7487dbb74c77383e60b292845495163a9e21fb70a4fdacdda933413e43163f0d transfer/mpqa/mpqa.pos
c4ac36eaa8adc8ee31c31f69594bfbe68d83ef5b6db53f1f19b28c0be52f3999 transfer/mr/rt-polarity.neg
34e5b0da2d491e46b700b00afe735aaae0962bcfe4f7f22b2d8077e714fa370f transfer/mr/rt-polarity.pos
a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784 transfer/mrpc/msr_paraphrase_test.txt
60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89 transfer/mrpc/msr_paraphrase_train.txt
9a6c7403b71a9b762158387afe4431253ae10cdfb2319b5275289f3766f48291 transfer/sst2/sentiment-dev
4fefd1cd67526cf87ebc7fafc3afc21cc7cfa6ae53b45e74f77f9456e3c62752 transfer/sst2/sentiment-test
10a92a297ec38e262386e5a2713b4bc70e5d18ced88b7f54bd171a26e5b34ab5 transfer/sst2/sentiment-train
d8ccd43f1674f1c17e4ab717564e3561cfb719b0db4cfb19e5677427c68ff8a1 transfer/subj/subj.objective
274c2ffe59c204dc4df779848561786f59a98cc20dda3cfdd7d9f76a4f730710 transfer/subj/subj.subjective
86ad53c8fc9d397ab2f4be7c967d8efb470b260140557d3e57afad69d1b88b76 transfer/trec/TREC_10.label
8bd6e79493f43bbd22c364587366a1dced54e1e31259eaa92721a0f526031116 transfer/trec/train_5500.label
"""


def source(path):
    """(url, member): the raw GitHub URL of a file, or of the zip holding it plus its name there."""
    folder, name = path.rsplit("/", 1)
    if folder in ZIPPED:
        repo, zip_path, inner = ZIPPED[folder]
        return f"https://raw.githubusercontent.com/{repo}/{COMMITS[repo]}/{zip_path}", f"{inner}/{name}"
    repo, remote = FILE_SOURCES.get(path) or FOLDERS[folder]
    return f"https://raw.githubusercontent.com/{repo}/{COMMITS[repo]}/{remote + '/' if remote else ''}{name}", None


def plan(root, sets):
    """[(path, sha256)] of the checksummed files of `sets` that are missing under root or differ."""
    wanted = [line.split()[::-1] for line in SHA256.strip().splitlines()]
    return [(path, sha) for path, sha in wanted if path.split("/")[0] in sets and not (
        (root / path).is_file() and hashlib.sha256((root / path).read_bytes()).hexdigest() == sha)]


_ZIPS = {}  # a zip is fetched once for all its members


def fetch(url, member=None):
    if url not in _ZIPS:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                _ZIPS[url] = response.read()
        except OSError as e:  # offline, DNS failure, HTTP error, timeout
            raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}): this needs internet access; or "
                            "copy the data from a machine that has it and point SENTEMB_DATA or --data-dir there") from None
    data = _ZIPS[url] if url.endswith(".zip") else _ZIPS.pop(url)
    return zipfile.ZipFile(io.BytesIO(data)).read(member) if member else data


def write(dest, data):
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic(dest) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        raise UserError(f"cannot write {dest}: {e.strerror}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=str(HERE), help="target folder (default: the data/ folder of this checkout)")
    p.add_argument("--sets", default=",".join(SETS),
                   help=f"comma-separated subset of {','.join(SETS)} (default: all). nli = SNLI dev/test "
                        "in SentEval form plus SimCSE's 275k training triplets (nli_for_simcse.csv)")
    p.add_argument("--list", action="store_true", help="print what would be fetched from where, and fetch nothing")
    args = p.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or set(sets) - set(SETS):
        raise UserError(f"--sets takes names from {','.join(SETS)}")
    root = pathlib.Path(args.dest).expanduser()
    todo = plan(root, sets)
    nli = "nli" in sets and not (root / "nli" / "nli_for_simcse.csv").exists()  # no published checksum
    if args.list:
        for path, _ in todo:
            print(f"{path}  <-  {' member '.join(filter(None, source(path)))}")
        if nli:
            print(f"nli/nli_for_simcse.csv  <-  {NLI_FOR_SIMCSE}")
        for path, origin in NOT_DOWNLOADED.items():
            print(f"{path}  not downloaded: {origin}")
        return 0
    for path, sha in todo:
        url, member = source(path)
        data = fetch(url, member)
        if hashlib.sha256(data).hexdigest() != sha:
            raise UserError(f"{url} ({path}) does not have the expected sha256 {sha}")
        write(root / path, data)
        print(f"  {path}")
    if nli:
        print("  nli/nli_for_simcse.csv (large, please wait)")
        write(root / "nli" / "nli_for_simcse.csv", fetch(NLI_FOR_SIMCSE))
    print(f"{len(todo) + nli} files downloaded into {root}; not downloaded (derived): {', '.join(NOT_DOWNLOADED)} "
          "(`--list` says where they come from)")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main, interrupted="each file downloaded so far is complete; a rerun resumes"))
