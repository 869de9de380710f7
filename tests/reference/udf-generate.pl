#!/usr/bin/perl
# Reference for the UDF tests: the upgrade-description files that
# tails-iuk-generate-upgrade-description-files writes (tails-iuk.md §5.2),
# re-enacted with the libraries it uses: YAML::XS (load and dump), sha256
# and size of the files on disk.
#
#   udf-generate.pl --version V --next_version V... [--previous_version V...]
#       [--major_release] --iso FILE --iuks DIR --release_checkout DIR
#       [--channel stable|alpha] [--build_target amd64] [--product_name Tails]
use strict;
use warnings;
use Digest::SHA;
use File::Path qw(make_path);
use File::Basename qw(dirname);
use Getopt::Long;
use YAML::XS;

my %o = (channel => 'stable', build_target => 'amd64', product_name => 'Tails');
my (@next, @previous);
GetOptions(
    'version=s' => \$o{version}, 'next_version=s' => \@next,
    'previous_version=s' => \@previous, 'major_release' => \$o{major},
    'iso=s' => \$o{iso}, 'iuks=s' => \$o{iuks},
    'release_checkout=s' => \$o{checkout}, 'channel=s' => \$o{channel},
    'build_target=s' => \$o{build_target}, 'product_name=s' => \$o{product_name},
) or die "bad options\n";

sub udf_path {
    my ($version, $channel) = @_;
    "$o{checkout}/wiki/src/upgrade/v2/$o{product_name}/$version/$o{build_target}/$channel/upgrades.yml";
}

sub target {
    my ($file, $url) = @_;
    my $sha = Digest::SHA->new(256);
    $sha->addfile($file);
    return { sha256 => $sha->hexdigest, size => -s $file, url => $url };
}

sub spew {
    my ($path, $data) = @_;
    make_path(dirname($path));
    open my $fh, '>:raw', $path or die "$path: $!";
    print $fh Dump($data);
    close $fh or die "$path: $!";
}

sub fresh {
    my ($version, $channel) = @_;
    return {
        'product-name' => $o{product_name}, 'initial-install-version' => $version,
        'build-target' => $o{build_target}, 'channel' => $channel,
    };
}

for my $c ('alpha', 'stable') { spew(udf_path($o{version}, $c), fresh($o{version}, $c)) }
for my $c ('alpha', 'stable') { spew(udf_path($_, $c), fresh($_, $c)) for @next }

(my $news = $o{version}) =~ s/~/-/;
my $details = $o{channel} eq 'stable'
    ? "https://tails.net/news/version_$news/" : "https://tails.net/news/test_$news/";
my $stem = lc($o{product_name}) . "-$o{build_target}-$o{version}";
my $base = "https://download.tails.net/tails/$o{channel}";

for my $c ('alpha', 'stable') {
    for my $prev (@previous) {
        next if $o{channel} eq 'stable' && $c eq 'alpha' && $prev !~ /~(alpha|beta|rc)[0-9]*$/;
        next if $o{channel} eq 'alpha' && $c eq 'stable';
        my $path = udf_path($prev, $c);
        my $udf;
        if (-e $path) {
            my $loaded = YAML::XS::LoadFile($path);
            $udf = { map { exists $loaded->{$_} ? ($_ => $loaded->{$_}) : () }
                     qw(product-name initial-install-version build-target channel) };
        } else {
            $udf = fresh($prev, $c);
        }
        my @paths = ({ type => 'full',
                       'target-files' => [ target($o{iso}, "$base/$stem/$stem.iso") ] });
        my $iuk = "$o{product_name}_$o{build_target}_${prev}_to_$o{version}.iuk";
        if (-f "$o{iuks}/$iuk") {
            push @paths, { type => 'incremental',
                           'target-files' => [ target("$o{iuks}/$iuk", "$base/iuk/v2/$iuk") ] };
        }
        $udf->{upgrades} = [ {
            version => $o{version}, 'details-url' => $details,
            type => $o{major} ? 'major' : 'minor', 'upgrade-paths' => \@paths,
        } ];
        spew($path, $udf);
    }
}
