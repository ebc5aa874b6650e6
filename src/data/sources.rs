//! Where each data set comes from: the canonical upstream files, pinned by size and SHA-256, and
//! the places a machine may already hold them.
//!
//! A download is accepted only when it has exactly the pinned size and checksum, so a changed,
//! truncated or tampered file is never used. The base URL can be pointed at a mirror (see
//! [`DataSource::base_url_env`]); the checksums stay the same wherever the bytes come from.

/// One file of a data set as its upstream publishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name, both in the upstream URL (after the base) and on disk.
    pub name: &'static str,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: &'static str,
}

/// A data set: its files, where they are published, and where a machine may already hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSource {
    /// Name in messages ("Fashion-MNIST").
    pub title: &'static str,
    /// Folder name under the cache directory.
    pub cache_name: &'static str,
    /// Environment variable naming a folder that holds the files (used as is, never
    /// downloaded into).
    pub dir_env: &'static str,
    /// Environment variable replacing [`DataSource::base_url`] (a mirror, or a test server).
    pub base_url_env: &'static str,
    /// Where the files are published; a file's URL is this followed by its name.
    pub base_url: &'static str,
    /// Where the Debian package installs the files, and the package's name.
    pub system_dir: &'static str,
    pub system_package: &'static str,
    /// Files whose presence in [`DataSource::system_dir`] shows that the package is installed
    /// (Debian's files may differ from upstream's bytes, so they are not checksummed).
    pub system_markers: &'static [&'static str],
    pub files: &'static [RemoteFile],
}

impl DataSource {
    /// Total size of the files in bytes.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// Fashion-MNIST as Zalando Research publishes it (the URLs and MD5s of the project's README:
/// the files below have those MD5s; their SHA-256 is pinned here). Debian's
/// `dataset-fashion-mnist` holds the same compressed data with a different gzip header (no
/// original file name, another time stamp), so its files decompress to the same bytes but have
/// other checksums.
pub const FASHION_MNIST: DataSource = DataSource {
    title: "Fashion-MNIST",
    cache_name: "fashion-mnist",
    dir_env: "RECYCLE_FASHION_MNIST_DIR",
    base_url_env: "RECYCLE_FASHION_MNIST_URL",
    base_url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    system_dir: "/usr/share/datasets/fashion-mnist",
    system_package: "dataset-fashion-mnist",
    system_markers: &[
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ],
    files: &[
        // MD5 8d4fb7e6c68d591d4c3dfef9ec88bf0d
        RemoteFile {
            name: "train-images-idx3-ubyte.gz",
            size: 26_421_880,
            sha256: "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        },
        // MD5 25c81989df183df01b3e8a0aad5dffbe
        RemoteFile {
            name: "train-labels-idx1-ubyte.gz",
            size: 29_515,
            sha256: "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        },
        // MD5 bef4ecab320f06d8554ea6380940ec79
        RemoteFile {
            name: "t10k-images-idx3-ubyte.gz",
            size: 4_422_102,
            sha256: "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        },
        // MD5 bb300cfdad3c16e7a12a480ee83cd310
        RemoteFile {
            name: "t10k-labels-idx1-ubyte.gz",
            size: 5_148,
            sha256: "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        },
    ],
};

/// The fortune files of fortune-mod (the upstream of Debian's `fortunes`), release 3.26.1
/// (tag `fortune-mod-3.26.1`, commit 0e207e3a14e4777ae652224e983299be756130be), from
/// `fortune-mod/datfiles/`: every file of that folder except the build script, without the
/// offensive `off/` set. Debian's `fortunes` (1.99.1 with Debian's changes) holds an older,
/// edited version of the same collection: the same format and kind of text, other bytes.
pub const FORTUNES: DataSource = DataSource {
    title: "fortunes (fortune-mod 3.26.1)",
    cache_name: "fortunes",
    dir_env: "RECYCLE_TEXT_DIR",
    base_url_env: "RECYCLE_TEXT_URL",
    base_url: "https://raw.githubusercontent.com/shlomif/fortune-mod/\
               0e207e3a14e4777ae652224e983299be756130be/fortune-mod/datfiles/",
    system_dir: "/usr/share/games/fortunes",
    system_package: "fortunes",
    // `fortunes-min` installs only `fortunes`; these come with the full package.
    system_markers: &["fortunes", "computers", "science"],
    files: &[
        text_file(
            "art",
            87371,
            "ffa86c725dac97b4cf82a229c60c6a66ce408cfbc3c186b824d597439402ea2e",
        ),
        text_file(
            "ascii-art",
            5874,
            "6f031a4a93aa541222834ddb93675b44b8e66970205c52dc1c618db0678eac29",
        ),
        text_file(
            "computers",
            245021,
            "dd0f402de7fa059474d0beb62434f104b8c43dae317cd8af2eba6c0489d05971",
        ),
        text_file(
            "cookie",
            245916,
            "5474a2ad680a059a4032967739d3af8db9bc62653ef8ca27e160818036c1914b",
        ),
        text_file(
            "debian",
            15651,
            "0a3bd809bf260a22355adfdb90660f545286d3b537a52c76ff174441389c03fc",
        ),
        text_file(
            "definitions",
            180226,
            "de4d02452d81a8c99ebf4fac11fd381e38837093e7ca3b0a2ac407c4a416de2f",
        ),
        text_file(
            "disclaimer",
            10749,
            "c085d66ea68686d5e28852cef77c3eeb3640895c5647b148deeaaada2c07fa7b",
        ),
        text_file(
            "drugs",
            40401,
            "3401bef7ac46054c624020be8299b898da30f871dc2e32738cbd7720aaa726b0",
        ),
        text_file(
            "education",
            39636,
            "1ab3e719b3ac26203cbb2c2be5900121931dc3500695128692d9edb76a5cd5d2",
        ),
        text_file(
            "ethnic",
            34517,
            "2372efca809ec676ce0efe563f2427dfa5a4a77622cd24e95024c5407b1e0311",
        ),
        text_file(
            "food",
            33863,
            "5bd9b85137360eda2187df1b65801a9399a0007f56b700762d7d372ffeeaec85",
        ),
        text_file(
            "fortunes",
            24513,
            "59767da5b93bb647f0963ee5c9866a9297a6ab04e5ce6110ba8ae305bd578228",
        ),
        text_file(
            "goedel",
            7312,
            "897da4af9e4cfcb86fd0983a6aad423cef6237207a1fce88e186d5cfbbfa3891",
        ),
        text_file(
            "humorists",
            43244,
            "ddac9ee6905a9ae267132dcd1ba2c24e0f7d3a658b16477e896a89f9eff33bf9",
        ),
        text_file(
            "kids",
            28760,
            "732d19a46fd54a7a6e0c9d0183213c8988f1b07bd822907ed2391c49380a1b0a",
        ),
        text_file(
            "knghtbrd",
            88010,
            "795ae8ce24f7623ed5d8f23b73c72dec821acdb6b2f926a5cd3e7a483c31af0b",
        ),
        text_file(
            "law",
            56605,
            "1cf7ab509ed78c82f7205bb78b430e776afc8b30decb24efb420ebd434a1943f",
        ),
        text_file(
            "linux",
            70211,
            "2ae9cdd10358763b84d2128956cee88999461a59903ac86659469916af5f68b0",
        ),
        text_file(
            "literature",
            53734,
            "0c9d1b12f6d4492125785cb9b3974435057f58be7e72be50bcaeb4c704f377bf",
        ),
        text_file(
            "love",
            20413,
            "7cbb38a1adcdd4925638f4f059c78b6f918348d24c77a1d13eca682592cc7aa6",
        ),
        text_file(
            "magic",
            9812,
            "da5757613d1e69df6b1f2d976b1728ce491504f0f1017acef9207d0d393139ca",
        ),
        text_file(
            "medicine",
            19194,
            "4b4ec69e40ae39d9c8387179a39a5519a6e4a809387272036eda7979db855a7a",
        ),
        text_file(
            "men-women",
            101342,
            "c9921ad257185515b1ce0d2610653043158b364cd28ea5e552f44cdf524deffb",
        ),
        text_file(
            "miscellaneous",
            47739,
            "f5fbc32a3277a451177b97180b449f6267ddf6e94a2733c234991596777c5d81",
        ),
        text_file(
            "news",
            11233,
            "0115ac7bf3c2b2880cb3ea0f35c9b06a645fb1fc9c9b9a79b0b61b44bad78206",
        ),
        text_file(
            "paradoxum",
            6022,
            "71f009258e65c512024f671b9a41ae48bc1adb84cb477882cdce9f1fac6da8b8",
        ),
        text_file(
            "people",
            153095,
            "cd46e670e7b56c7fc745d3fddcbd2e379410bf145359ec356aa1143114f8f52f",
        ),
        text_file(
            "perl",
            39977,
            "05165d48c1e8852d2afbbd6dbe196b5ffcdbc853246e02c2bb87d6cfa7fa42de",
        ),
        text_file(
            "pets",
            7125,
            "f995bf9ea09cece7a4d0079aeda8c2222ac3e2b469c06ee81a2cb7b6a07563b8",
        ),
        text_file(
            "platitudes",
            35473,
            "0ae0dbe2fc62d275cb54ea9f72438d8a3d02b1844eb74b81bd1761557245be42",
        ),
        text_file(
            "politics",
            114105,
            "d87bab83c652fbdf3eb510a29cf217fda650c73dc566ec7ddc2d042699a795a9",
        ),
        text_file(
            "pratchett",
            148326,
            "701d9be1fa6d45db0f9feaef976c7daf8e491bec2d131d7be59d8f61c046ef7f",
        ),
        text_file(
            "riddles",
            20154,
            "5d2521a3556d07a20d6e70b9a07f92a32bcfc02d54ede6d5b765b1dda0b1b55c",
        ),
        text_file(
            "science",
            130312,
            "8ef1135881079ddcd85d8a02dc635a8b511c1f71f0e944b1ab751b496ff0e800",
        ),
        text_file(
            "shlomif-fav",
            135159,
            "c145be0d18601bacdf2dd3bbf4a6833f08d1309ad35042f4bc5481a8de7afcf7",
        ),
        text_file(
            "songs-poems",
            233057,
            "844d55063780cf0e60b043f72847e2f91062b0c15496615fe11aec681d847b07",
        ),
        text_file(
            "sports",
            36550,
            "48358a805efc34a7a85ee3dac17f3a7c69e895fa2f8a2daff2f0486fba8dc002",
        ),
        text_file(
            "startrek",
            30320,
            "94c57f2e551066968857b0cffd9f8eb31ac15e416050d717175c21fdd587e9bb",
        ),
        text_file(
            "tao",
            37139,
            "dbd37b9e17738d34aaea13aae0b805e83a31e72fa1350e80a2c5575d4165cedd",
        ),
        text_file(
            "the-x-files-taglines",
            2285,
            "13db8c224f808784dbf9bc09dbbf4206dee5278cdfcab635c16ac54b36057e44",
        ),
        text_file(
            "translate-me",
            1884,
            "d2c3eda6f2b200febb67fa41564df77cd73b0342cb6d37b81293d5ce8868def5",
        ),
        text_file(
            "wisdom",
            62696,
            "4c8d75cc20839d03a39cb9356cf6673ab57423e6db8ffad648257ba7db5602fc",
        ),
        text_file(
            "work",
            106558,
            "cb409643b9a83c8675c01acae614a57361e3712f66d15e5733b7f8c171b1e354",
        ),
        text_file(
            "zippy",
            38851,
            "958abb8f202e41871c442950dd243130a9c9614cda60df06ce6b6403622bae86",
        ),
    ],
};

const fn text_file(name: &'static str, size: u64, sha256: &'static str) -> RemoteFile {
    RemoteFile { name, size, sha256 }
}
